"""One script for a GPU machine: build with CUDA, run the CUDA and Triton tests, then time the
optimizer steps and print one Markdown table to commit under bench/results/.

    python bench/gpu_check.py                 # build, test, benchmark
    python bench/gpu_check.py --skip-build    # benchmark the installed build only

Times are CUDA-event medians after warm-up. Optimizer rows compare fusedtrain's step with torch's
fused=True and foreach=True steps on the same parameters, and report bandwidth against a
device-to-device copy of the same number of bytes measured in the same run. Then the linear +
MSE train step against the stock loop (eager and torch.compile), and Triton against CUDA C++.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (optimizer, constructor arguments, bytes moved per element per stream count)
OPTIMIZERS = {"Adam": ({"lr": 1e-3}, 7), "AdamW": ({"lr": 1e-3}, 7), "SGD": ({"lr": 1e-3, "momentum": 0.9}, 5)}
# (label, number of tensors, elements per tensor)
SIZES = [("1x1e6", 1, 10**6), ("1x1e8", 1, 10**8), ("1x1e9", 1, 10**9), ("1000x1e5", 1000, 10**5),
         ("10000x1e3", 10000, 10**3)]


def run(command: list[str], env: dict | None = None) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def cuda_time(fn, warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of fn() by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def step_of(module, name: str, kwargs: dict, params, grads):
    import torch

    clones = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(clones, grads):
        p.grad = g
    opt = getattr(module, name)(clones, **kwargs)
    opt.step()
    return opt.step


def benchmark_rows() -> list[str]:
    import torch

    import fusedtrain.optim

    rows = [f"| optimizer | size | fusedtrain | torch fused | torch foreach | copy GB/s | fusedtrain GB/s | "
            "vs fused | vs copy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    free = torch.cuda.mem_get_info()[0]
    for label, count, numel in SIZES:
        for name, (kwargs, streams) in OPTIMIZERS.items():
            total = count * numel
            if total * 4 * (streams + 4) > 0.8 * free:  # params, grads, state and a copy's buffers
                rows.append(f"| {name} | {label} | skipped: needs more than 80% of free GPU memory | | | | | | |")
                continue
            params = [torch.randn(numel, device="cuda") for _ in range(count)]
            grads = [torch.randn(numel, device="cuda") for _ in range(count)]
            ours = cuda_time(step_of(fusedtrain.optim, name, kwargs, params, grads))
            fused = cuda_time(step_of(torch.optim, name, dict(kwargs, fused=True), params, grads))
            foreach = cuda_time(step_of(torch.optim, name, dict(kwargs, foreach=True), params, grads))
            step_bytes = streams * total * 4
            src = torch.empty(step_bytes // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy = cuda_time(lambda: dst.copy_(src))  # reads and writes step_bytes in all
            rows.append(f"| {name} | {label} | {ours * 1e3:.3f} ms | {fused * 1e3:.3f} ms | {foreach * 1e3:.3f} ms | "
                        f"{step_bytes / copy / 1e9:.0f} | {step_bytes / ours / 1e9:.0f} | {fused / ours:.2f} | "
                        f"{copy / ours:.2f} |")
            del params, grads, src, dst
            torch.cuda.empty_cache()
    return rows


def triton_rows() -> list[str]:
    """The Triton kernels against the CUDA C++ ones on the same ops and tensors."""
    import torch

    import fusedtrain.triton

    rows = ["| op | size | CUDA C++ | Triton | Triton / CUDA |", "|---|---|---:|---:|---:|"]
    for label, count, numel in [("1x1e8", 1, 10**8), ("1000x1e5", 1000, 10**5)]:
        def lists():
            return ([torch.randn(numel, device="cuda") for _ in range(count)],
                    [torch.randn(numel, device="cuda") for _ in range(count)],
                    [torch.zeros(numel, device="cuda") for _ in range(count)],
                    [torch.zeros(numel, device="cuda") for _ in range(count)], [],
                    [torch.zeros((), device="cuda") for _ in range(count)])
        hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False)
        a, b = lists(), lists()
        cuda = cuda_time(lambda: torch.ops.fusedtrain.adam_step_(*a, *hyper))
        tri = cuda_time(lambda: fusedtrain.triton.adam_step_(*b, *hyper))
        rows.append(f"| adam_step_ | {label} | {cuda * 1e3:.3f} ms | {tri * 1e3:.3f} ms | {tri / cuda:.2f} |")
        del a, b
    for n, inp, out in [(100_000, 1024, 1), (100_000, 1024, 16), (16_384, 1024, 1024)]:
        x, w, b = (torch.randn(n, inp, device="cuda"), torch.randn(out, inp, device="cuda"),
                   torch.randn(out, device="cuda"))
        y = torch.randn(n, out, device="cuda")
        cuda = cuda_time(lambda: torch.ops.fusedtrain.linear_mse_fwd_bwd(x, w, b, y, 1, False))
        tri = cuda_time(lambda: fusedtrain.triton.linear_mse_fwd_bwd(x, w, b, y, 1, False))
        rows.append(f"| linear_mse_fwd_bwd | {n}x{inp}->{out} | {cuda * 1e3:.3f} ms | {tri * 1e3:.3f} ms | {tri / cuda:.2f} |")
    return rows


def train_step_rows() -> list[str]:
    """One Adam step of nn.Linear + MSE: the stock eager loop, the stock loop with the forward
    and loss under torch.compile, and FusedTrainStep."""
    import torch

    import fusedtrain

    rows = ["| x -> out | stock eager | stock compiled | FusedTrainStep | vs eager | vs compiled |",
            "|---|---:|---:|---:|---:|---:|"]
    for n, inp, out in [(100_000, 1024, 1), (100_000, 1024, 16), (16_384, 1024, 1024)]:
        x, y = torch.randn(n, inp, device="cuda"), torch.randn(n, out, device="cuda")
        times = {}
        for variant in ("eager", "compiled", "fused"):
            torch.manual_seed(0)
            model = torch.nn.Linear(inp, out).cuda()
            if variant == "fused":
                step = fusedtrain.FusedTrainStep(model, fusedtrain.optim.Adam(model.parameters(), lr=1e-3))
                times[variant] = cuda_time(lambda: step(x, y))
                continue
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            loss_fn = (torch.compile(lambda a, t: torch.nn.functional.mse_loss(model(a), t)) if variant == "compiled"
                       else lambda a, t: torch.nn.functional.mse_loss(model(a), t))

            def stock_step():
                opt.zero_grad()
                loss_fn(x, y).backward()
                opt.step()
            times[variant] = cuda_time(stock_step)
        rows.append(f"| {n}x{inp} -> {out} | {times['eager'] * 1e3:.3f} ms | {times['compiled'] * 1e3:.3f} ms | "
                    f"{times['fused'] * 1e3:.3f} ms | {times['eager'] / times['fused']:.2f} | "
                    f"{times['compiled'] / times['fused']:.2f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not args.skip_build:
        run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "."], {"FUSEDTRAIN_CUDA": "1"})
    if not args.skip_tests:
        run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py", "tests/test_triton.py",
             "tests/test_triton_linear_mse.py"])
    import torch

    print(f"\n# GPU check, {torch.cuda.get_device_name(0)}, {datetime.date.today().isoformat()}\n")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; command: python bench/gpu_check.py\n")
    print("## Optimizer steps\n")
    print("\n".join(benchmark_rows()))
    print("\n## Linear + MSE train step (Adam)\n")
    print("\n".join(train_step_rows()))
    print("\n## Triton against CUDA C++\n")
    print("\n".join(triton_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
