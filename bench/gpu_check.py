"""The GPU check: one command for a GPU machine that builds fusedtrain with CUDA for the GPU it
finds, refuses to go on unless those CUDA kernels are the ones loaded, runs every GPU test (a
skipped one counts as a failure), and times the GPU benchmarks, within a time budget.

    python bench/gpu_check.py --out bench/results/gpu-run     # build, verify, test, benchmark
    python bench/gpu_check.py --dry-run                       # the plan and its budget; no GPU needed
    python bench/gpu_check.py --out DIR --skip-build          # test and time the installed build

Everything measured is written as soon as it is measured, unbuffered, to stdout and to
DIR/summary.md (device, date, versions and the exact command first), so a run that is killed
still leaves what it measured; the build and test logs go to DIR/build.log and DIR/tests*.log.
A failing test is reported and the benchmarks still run. Exit status: 0 when the build loaded,
every GPU test passed (the two-GPU tests may be listed as skipped on a one-GPU machine) and no
benchmark row failed; 1 otherwise; 2 when the CUDA kernels could not be built or loaded.

Benchmark times are CUDA-event medians after warm-up, stock and fused measured in the same run.
Bandwidth counts the bytes a step must move, which is what the kernels move: Adam reads param,
grad, exp_avg and exp_avg_sq and writes param, exp_avg and exp_avg_sq (7 streams per element);
SGD with momentum reads param, grad and the buffer and writes param and buffer (5); the grad is
written back only under a GradScaler's grad_scale, which these steps do not use. "vs copy" is
that bandwidth over a device-to-device copy of as many bytes (read plus write) in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GPU tests carry the `gpu` marker (pyproject.toml); the check runs them from the repository root,
# as a developer's `python -m pytest` would.
# -v: each test's outcome is printed as it ends, so a run killed at its limit still shows which
# tests passed before it.
TEST_COMMAND = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "tests"]
# The GPU tests in two pytest runs, each killed at its own time limit: (marker expression, name of
# its report, seconds kept for it). Tests that replay cooperative grids on two streams at once go
# last and alone: were the driver ever to start two such grids that cannot all be resident together,
# they would wait on each other for good, and only those tests would be lost to the limit.
TEST_RUNS = [("gpu and not concurrent_grids", "tests.xml", None),
             ("gpu and concurrent_grids", "tests-concurrent.xml", 45)]
# The only tests that may skip: they need a second GPU, which a one-GPU machine lacks.
ALLOWED_SKIP = "needs two GPUs"

# Seconds each stage is planned to take on an H100/H200 with a cold Triton cache (estimates, to be
# replaced by what a run measures), and the whole budget: device time is scarce.
DEFAULT_BUDGET_S = 420
STAGE_ESTIMATES_S = {"build": 150, "verify": 15, "tests": 150, "benchmarks": 100}
# The tests get at most this much, so the benchmarks always have some time.
TEST_LIMIT_S = 240
BENCHMARK_RESERVE_S = 90

# Optimizer-step rows: (label, number of tensors, elements per tensor, dtype name).
OPTIMIZER_SIZES = [("1x1e8 fp32", 1, 10**8, "float32"), ("1000x1e5 fp32", 1000, 10**5, "float32"),
                   ("10000x1e3 fp32", 10000, 10**3, "float32"), ("1x1e8 bf16", 1, 10**8, "bfloat16")]
# name -> (constructor arguments, streams of memory traffic per element: see the docstring)
OPTIMIZERS = {"Adam": ({"lr": 1e-3}, 7), "AdamW": ({"lr": 1e-3}, 7),
              "SGD": ({"lr": 1e-3, "momentum": 0.9}, 5)}
# Linear + MSE train-step rows: (rows, in, out).
TRAIN_STEP_SIZES = [(100_000, 1024, 1), (100_000, 1024, 16), (16_384, 1024, 1024)]


class Report:
    """Writes each line to stdout and appends it to DIR/summary.md at once (flushed), so a killed
    run leaves every line it got to."""

    def __init__(self, out: Path | None) -> None:
        self.path = out / "summary.md" if out is not None else None
        if self.path is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.failures: list[str] = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path is not None:
            with open(self.path, "a") as summary:
                summary.write(text + "\n")

    def table(self, title: str, columns: list[str]) -> None:
        self.line(f"\n## {title}\n")
        self.line("| " + " | ".join(columns) + " |")
        self.line("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")

    def row(self, cells: list[str]) -> None:
        self.line("| " + " | ".join(cells) + " |")

    def fail(self, what: str) -> None:
        self.failures.append(what)


class Budget:
    """The seconds left of the run's budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def device_arch() -> str | None:
    """TORCH_CUDA_ARCH_LIST for GPU 0 only (e.g. "9.0"), or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def build_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "."]


def build_env(arch: str) -> dict[str, str]:
    return {"FUSEDTRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)}


def run_logged(command: list[str], log: Path | None, timeout: float, env: dict | None = None,
               echo: bool = True) -> tuple[int | None, str]:
    """Runs `command` in the repository root, its output streamed to stdout (echo) and to `log`;
    returns (exit status or None on time-out, the output's last 3000 characters). At the deadline
    the command's whole process group is killed, silent or not: a hung GPU test prints nothing."""
    print("$", shlex.join(command), flush=True)
    output = []
    with subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                          start_new_session=True) as process:
        timed_out = threading.Event()

        def kill_at_deadline() -> None:
            if process.poll() is None:
                timed_out.set()
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # children too, so that the output closes
                except ProcessLookupError:  # it ended just now
                    pass

        timer = threading.Timer(timeout, kill_at_deadline)
        timer.start()
        try:
            for text in process.stdout:
                output.append(text)
                if echo:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            status = process.wait()
        finally:
            timer.cancel()
    text = "".join(output)
    if log is not None:
        log.write_text(text[-200_000:])
    return (None if timed_out.is_set() else status), text[-3000:]


VERIFY = """
import torch, fusedtrain
from fusedtrain import _extension
c = _extension._C
assert c is not None, f"fusedtrain._C did not load: {_extension.LOAD_ERROR}"
assert c.has_cuda_kernels(), f"{c.__file__} was built without CUDA kernels"
assert torch.cuda.is_available(), "torch sees no CUDA device"
for op in ("adam_step_", "sgd_step_", "linear_mse_fwd_bwd", "stack_fwd_bwd", "stack_adam_step_", "stack_sgd_step_"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtrain::{op}", "CUDA"), f"{op} has no CUDA kernel"
print(f"loaded {c.__file__} for {fusedtrain.__file__}; CUDA kernels on {torch.cuda.get_device_name(0)}")
"""


def verify(report: Report) -> bool:
    """The CUDA kernels are the ones that `import fusedtrain` loads from the repository root."""
    status, tail = run_logged([sys.executable, "-c", VERIFY], None, timeout=120)
    report.line(f"\nverify: {'ok: ' + tail.strip().splitlines()[-1] if status == 0 else 'FAILED'}")
    if status != 0:
        report.line("```\n" + tail + "\n```")
    return status == 0


def run_tests(report: Report, out: Path, budget: Budget) -> None:
    """Every GPU test, in the runs of TEST_RUNS; any skip other than the two-GPU tests is a failure,
    and so is a run that does not finish."""
    stage_end = time.monotonic() + max(30.0, min(TEST_LIMIT_S, budget.left() - BENCHMARK_RESERVE_S))
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped (allowed)": [],
                                      "skipped (counted as failed)": [], "did not finish": []}
    notes = []
    for index, (markers, report_name, _) in enumerate(TEST_RUNS):
        # What the later runs keep is held back from this one.
        later = sum(kept for _, _, kept in TEST_RUNS[index + 1:] if kept is not None)
        limit = max(10.0, stage_end - time.monotonic() - later)
        junit, log = out / report_name, out / (Path(report_name).stem + ".log")
        began = time.monotonic()
        status, tail = run_logged(TEST_COMMAND + ["-m", markers, f"--junitxml={junit}"], log, timeout=limit)
        seconds = time.monotonic() - began
        if status is None or not junit.exists():
            outcomes["did not finish"].append(f"-m '{markers}': " + (
                f"killed after {seconds:.0f} s (limit {limit:.0f} s)" if status is None else f"exit {status}, no report"))
            for name, outcome in log_outcomes(log.read_text()):
                outcomes[outcome].append(name)
            notes.append(f"-m '{markers}' did not finish (the tests above from its log); its output ends:"
                         f"\n```\n{tail}\n```")
            continue
        for name, outcome in junit_outcomes(junit):
            outcomes[outcome].append(name)
        notes.append(f"-m '{markers}': {seconds:.0f} s, pytest exit {status}")
    report.table("GPU tests", ["outcome", "count", "tests"])
    for outcome, names in outcomes.items():
        report.row([outcome, str(len(names)), ", ".join(names) if outcome != "passed" else ""])
    report.line("")
    for note in notes:
        report.line(note)
    if outcomes["did not finish"]:
        report.fail("GPU tests did not finish")
    if not outcomes["passed"]:
        report.fail("no GPU test ran")
    if outcomes["failed"] or outcomes["skipped (counted as failed)"]:
        report.fail("GPU tests failed or skipped")


def log_outcomes(text: str):
    """(test name, outcome) of every test that `pytest -v` printed as ended; a skip's reason is not
    in those lines, so a skip counts as failed (the run failed anyway)."""
    kinds = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped (counted as failed)"}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and "::" in words[0] and words[1] in kinds:
            path, _, test = words[0].partition("::")
            yield f"{Path(path).stem}::{test}", kinds[words[1]]


def junit_outcomes(junit: Path):
    """(test name, outcome) of every test case in a pytest JUnit report."""
    for case in ElementTree.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            yield name, "failed"
        elif skipped is not None:
            reason = skipped.get("message", "")
            yield f"{name} ({reason})", "skipped (allowed)" if ALLOWED_SKIP in reason else "skipped (counted as failed)"
        else:
            yield name, "passed"


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


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def guarded_rows(report: Report, budget: Budget, seconds_per_row: float, rows, width: int) -> None:
    """Runs each (label, measure) of `rows`, writing the row measure() returns; a row that fails
    is written with its error and the next one runs; rows past the budget are listed as not run."""
    for label, measure in rows:
        if budget.left() < seconds_per_row:
            report.row([label, "not run: time budget spent"] + [""] * (width - 2))
            continue
        try:
            report.row([label] + measure())
        except Exception as error:  # noqa: BLE001 - a row's failure is reported, the rest go on
            report.row([label, f"FAILED: {type(error).__name__}: {str(error)[:200]}"] + [""] * (width - 2))
            report.fail(f"benchmark row {label}")
        finally:
            import torch

            torch.cuda.empty_cache()


def optimizer_rows(report: Report, budget: Budget) -> None:
    import torch

    import fusedtrain.optim

    columns = ["optimizer, size", "fusedtrain", "torch fused", "torch foreach", "copy GB/s",
               "fusedtrain GB/s", "vs fused", "vs copy"]
    report.table("Optimizer steps", columns)

    def step_of(module, name, kwargs, params, grads):
        clones = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(clones, grads):
            p.grad = g
        opt = getattr(module, name)(clones, **kwargs)
        opt.step()  # creates the state
        return opt.step

    def measure(name, kwargs, streams, count, numel, dtype):
        params = [torch.randn(numel, device="cuda", dtype=dtype) for _ in range(count)]
        grads = [torch.randn(numel, device="cuda", dtype=dtype) for _ in range(count)]
        ours = cuda_time(step_of(fusedtrain.optim, name, kwargs, params, grads))
        fused = cuda_time(step_of(torch.optim, name, dict(kwargs, fused=True), params, grads))
        foreach = cuda_time(step_of(torch.optim, name, dict(kwargs, foreach=True), params, grads))
        step_bytes = streams * count * numel * params[0].element_size()
        src = torch.empty(step_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy = cuda_time(lambda: dst.copy_(src))  # reads and writes step_bytes in all
        return [ms(ours), ms(fused), ms(foreach), f"{step_bytes / copy / 1e9:.0f}",
                f"{step_bytes / ours / 1e9:.0f}", f"{fused / ours:.2f}", f"{copy / ours:.2f}"]

    rows = [(f"{name}, {label}", lambda n=name, k=kwargs, s=streams, c=count, e=numel, d=dtype:
             measure(n, k, s, c, e, getattr(torch, d)))
            for label, count, numel, dtype in OPTIMIZER_SIZES
            for name, (kwargs, streams) in OPTIMIZERS.items()
            if dtype == "float32" or name == "Adam"]
    guarded_rows(report, budget, 8, rows, len(columns))


def linear_problem(n, inp, out):
    import torch

    return torch.randn(n, inp, device="cuda"), torch.randn(n, out, device="cuda")


def train_step_rows(report: Report, budget: Budget, compiled: bool) -> None:
    """One Adam step of nn.Linear + MSE: the stock loop (Adam fused=True), eager or with the
    forward and loss under torch.compile, against FusedTrainStep."""
    import torch

    import fusedtrain

    variant = "torch.compile" if compiled else "eager"
    columns = ["x -> out", f"stock {variant}", "FusedTrainStep", f"vs stock {variant}"]
    report.table(f"Linear + MSE train step, Adam: stock {variant} loop against FusedTrainStep", columns)

    def measure(n, inp, out):
        x, y = linear_problem(n, inp, out)
        torch.manual_seed(0)
        stock = torch.nn.Linear(inp, out).cuda()
        opt = torch.optim.Adam(stock.parameters(), lr=1e-3, fused=True)

        def loss_of(a, t):
            return torch.nn.functional.mse_loss(stock(a), t)

        loss_fn = torch.compile(loss_of) if compiled else loss_of

        def stock_step():
            opt.zero_grad()
            loss_fn(x, y).backward()
            opt.step()

        stock_time = cuda_time(stock_step)
        torch.manual_seed(0)
        model = torch.nn.Linear(inp, out).cuda()
        step = fusedtrain.FusedTrainStep(model, fusedtrain.optim.Adam(model.parameters(), lr=1e-3))
        fused_time = cuda_time(lambda: step(x, y))
        return [ms(stock_time), ms(fused_time), f"{stock_time / fused_time:.2f}"]

    rows = [(f"{n}x{inp} -> {out}", lambda n=n, i=inp, o=out: measure(n, i, o))
            for n, inp, out in TRAIN_STEP_SIZES]
    guarded_rows(report, budget, 60 if compiled else 6, rows, len(columns))


def stack_rows(report: Report, budget: Budget) -> None:
    """Layer stacks (issue 12's targets): the tutorial MLP's step and fit, a 64-64-64-1 stack on
    65536 rows, and the wide MLP, each against the stock loop in the same run."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import fusedtrain
    from fusedtrain import workloads

    columns = ["workload", "stock", "stock (other)", "fusedtrain", "vs stock", "vs other", "notes"]
    report.table("Layer stacks, Adam: the stock loop against FusedTrainStep / fit", columns)

    def pair(make_model, stock_kwargs):
        torch.manual_seed(0)
        stock = make_model().cuda()
        fused = make_model().cuda()
        fused.load_state_dict(stock.state_dict())
        return (stock, torch.optim.Adam(stock.parameters(), lr=1e-3, **stock_kwargs),
                fused, fusedtrain.optim.Adam(fused.parameters(), lr=1e-3))

    def stock_step(model, opt, x, y):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    def graphed(model, opt, x, y):
        """The stock step captured whole in a CUDA graph (torch's recipe: warm up on a side
        stream, grads set to None before the capture); returns its replay."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                stock_step(model, opt, x, y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return graph.replay

    def tutorial_step():
        x, y = (t.cuda() for t in workloads.nonlinear_data(32))
        stock, stock_opt, fused, fused_opt = pair(workloads.regression_mlp, {"fused": True})
        eager = cuda_time(lambda: stock_step(stock, stock_opt, x, y), repeats=200)
        g_model, g_opt, _, _ = pair(workloads.regression_mlp, {"capturable": True})
        replay = graphed(g_model, g_opt, x, y)
        captured = cuda_time(replay, repeats=200)
        step = fusedtrain.FusedTrainStep(fused, fused_opt)
        ours = cuda_time(lambda: step(x, y), repeats=200)
        return [f"{ms(eager)} eager fused=True", f"{ms(captured)} CUDA graph", ms(ours), f"{eager / ours:.2f}",
                f"{captured / ours:.2f}", "targets 5x eager, 1.5x graph"]

    def tutorial_fit():
        x, y = (t.cuda() for t in workloads.nonlinear_data(1000))
        stock, stock_opt, fused, fused_opt = pair(workloads.regression_mlp, {})

        def loader():
            return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                              generator=torch.Generator().manual_seed(0))

        stock_time = cuda_time(lambda: workloads.stock_loader_fit(stock, stock_opt, loader(), 5), 1, 3)
        ours = cuda_time(lambda: fusedtrain.fit(fused, fused_opt, loader(), epochs=5), 1, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fusedtrain.fit(fused, fused_opt, loader(), epochs=5)
            torch.cuda.synchronize()
        gpu_events = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = sum(1 for name in gpu_events if not name.startswith(("Memcpy", "Memset")))
        return [f"{ms(stock_time)} DataLoader loop", "", ms(ours), f"{stock_time / ours:.2f}", "",
                f"{kernels} kernel launches and {len(gpu_events) - kernels} copies per fit call; "
                "targets 50x, 1 launch"]

    def deep_narrow():
        x, y = (t.cuda() for t in workloads.regression(65536, 64, 1))

        def make():
            return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

        stock, stock_opt, fused, fused_opt = pair(make, {"fused": True})
        eager = cuda_time(lambda: stock_step(stock, stock_opt, x, y))
        c_model, c_opt, _, _ = pair(make, {"fused": True})
        compiled = torch.compile(lambda: stock_step(c_model, c_opt, x, y))
        compiled_time = cuda_time(compiled)
        step = fusedtrain.FusedTrainStep(fused, fused_opt)
        ours = cuda_time(lambda: step(x, y))
        return [f"{ms(eager)} eager fused=True", f"{ms(compiled_time)} torch.compile", ms(ours),
                f"{eager / ours:.2f}", f"{compiled_time / ours:.2f}", "targets 2x eager, 1.2x compile"]

    def wide():
        x, y = (t.cuda() for t in workloads.regression(256, 1024, 1024))
        stock, stock_opt, fused, fused_opt = pair(workloads.wide_mlp, {"fused": True})
        stock_step(stock, stock_opt, x, y)  # the state exists before the peak is measured
        step = fusedtrain.FusedTrainStep(fused, fused_opt)
        step(x, y)
        peaks = []
        for run in (lambda: stock_step(stock, stock_opt, x, y), lambda: step(x, y)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        eager = cuda_time(lambda: stock_step(stock, stock_opt, x, y))
        ours = cuda_time(lambda: step(x, y))
        return [f"{ms(eager)} eager fused=True", "", ms(ours), f"{eager / ours:.2f}", "",
                f"peak growth {peaks[0]:.0f} MiB stock, {peaks[1]:.0f} MiB fusedtrain; targets 1.0x, <= stock"]

    rows = [("tutorial MLP 10-64-32-1, one step, batch 32", tutorial_step),
            ("tutorial MLP, fit 5 epochs x 1000 rows, batch 32", tutorial_fit),
            ("64-64-64-1 ReLU, one step, batch 65536", deep_narrow),
            ("wide MLP 1024-4096-4096-1024, one step, batch 256", wide)]
    guarded_rows(report, budget, 20, rows, len(columns))


def triton_rows(report: Report, budget: Budget) -> None:
    """The Triton kernels against the CUDA C++ ones on the same ops and sizes."""
    import torch

    import fusedtrain.triton

    columns = ["op, size", "CUDA C++", "Triton", "Triton / CUDA"]
    report.table("Triton against CUDA C++", columns)
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False)

    def adam(count, numel):
        def lists():
            return ([torch.randn(numel, device="cuda") for _ in range(count)],
                    [torch.randn(numel, device="cuda") for _ in range(count)],
                    [torch.zeros(numel, device="cuda") for _ in range(count)],
                    [torch.zeros(numel, device="cuda") for _ in range(count)], [],
                    [torch.zeros((), device="cuda") for _ in range(count)])
        a, b = lists(), lists()
        cuda = cuda_time(lambda: torch.ops.fusedtrain.adam_step_(*a, *hyper))
        tri = cuda_time(lambda: fusedtrain.triton.adam_step_(*b, *hyper))
        return [ms(cuda), ms(tri), f"{tri / cuda:.2f}"]

    def linear_mse(n, inp, out):
        x, y = linear_problem(n, inp, out)
        w, b = torch.randn(out, inp, device="cuda"), torch.randn(out, device="cuda")
        cuda = cuda_time(lambda: torch.ops.fusedtrain.linear_mse_fwd_bwd(x, w, b, y, 1, False))
        tri = cuda_time(lambda: fusedtrain.triton.linear_mse_fwd_bwd(x, w, b, y, 1, False))
        return [ms(cuda), ms(tri), f"{tri / cuda:.2f}"]

    rows = [("adam_step_, 1x1e8", lambda: adam(1, 10**8)), ("adam_step_, 1000x1e5", lambda: adam(1000, 10**5))]
    rows += [(f"linear_mse_fwd_bwd, {n}x{inp} -> {out}", lambda n=n, i=inp, o=out: linear_mse(n, i, o))
             for n, inp, out in TRAIN_STEP_SIZES]
    guarded_rows(report, budget, 10, rows, len(columns))


def header(report: Report, command: str) -> None:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown (no git here)"
    gpu = (f"{torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}, "
           f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
           f"{torch.cuda.device_count()} visible)" if torch.cuda.is_available() else "none")
    report.line(f"# GPU check, {datetime.date.today().isoformat()}\n")
    report.line(f"- GPU: {gpu}")
    report.line(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
                f"python {platform.python_version()}, {os.cpu_count()} CPU cores")
    report.line(f"- fusedtrain commit: {commit}")
    report.line(f"- command: `{command}`")


def dry_run(budget_s: float, skip_build: bool) -> int:
    """The plan and its time budget, without building, testing or timing anything."""
    arch = device_arch()
    print(f"GPU: {'none here: ' if arch is None else ''}the build targets "
          f"{'TORCH_CUDA_ARCH_LIST of the GPU found (none now)' if arch is None else 'sm_' + arch.replace('.', '')} only")
    print(f"budget: {budget_s:.0f} s; stage estimates on an H100/H200 with a cold Triton cache (not yet measured):")
    plan = [("build", "FUSEDTRAIN_CUDA=1 TORCH_CUDA_ARCH_LIST=<GPU> MAX_JOBS=<cores> " + shlex.join(build_command()))]
    plan = ([] if skip_build else plan) + [
        ("verify", "import fusedtrain from the repo root: _C loaded, built with CUDA, CUDA kernels registered; else stop (exit 2)"),
        ("tests", "; ".join(shlex.join(TEST_COMMAND + ["-m", markers]) for markers, _, _ in TEST_RUNS)
         + f"  (at most {TEST_LIMIT_S} s in all; a skip other than '{ALLOWED_SKIP}' fails)"),
        ("benchmarks", "optimizer steps (Adam/AdamW/SGD vs torch fused and foreach, GB/s vs copy), "
                       "linear + MSE train step (eager), layer stacks (tutorial MLP step and fit, 64-64-64-1 "
                       "on 65536 rows, wide MLP with peak memory), Triton vs CUDA C++, linear + MSE under "
                       "torch.compile; "
                       "rows past the budget are listed as not run"),
    ]
    total = 0
    for stage, what in plan:
        total += STAGE_ESTIMATES_S[stage]
        print(f"  {stage:<10} ~{STAGE_ESTIMATES_S[stage]:>3} s  {what}")
    print(f"  total      ~{total} s of {budget_s:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="directory for summary.md, build.log, tests*.log, tests*.xml")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--skip-build", action="store_true", help="use the installed build")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its budget, run nothing")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run(args.budget, args.skip_build)
    if args.out is None:
        parser.error("--out DIR is required (the summary and logs go there)")
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    header(report, shlex.join(["python", "bench/gpu_check.py", *sys.argv[1:]]))
    arch = device_arch()
    if arch is None:
        report.line("\nno CUDA device: nothing to check here (see --dry-run)")
        return 2
    if not args.skip_build:
        began = time.monotonic()
        status, tail = run_logged(build_command(), args.out / "build.log", timeout=max(60.0, budget.left() - 60),
                                  env=build_env(arch), echo=False)
        report.line(f"\nbuild for sm_{arch.replace('.', '')}: {'ok' if status == 0 else 'FAILED'} "
                    f"in {time.monotonic() - began:.0f} s")
        if status != 0:
            report.line("```\n" + tail + "\n```")
            return 2
    if not verify(report):
        return 2
    run_tests(report, args.out, budget)
    for section in (optimizer_rows, lambda r, b: train_step_rows(r, b, compiled=False), stack_rows, triton_rows,
                    lambda r, b: train_step_rows(r, b, compiled=True)):
        try:
            section(report, budget)
        except Exception as error:  # noqa: BLE001 - a section that cannot start is reported
            report.line(f"\nsection failed: {type(error).__name__}: {error}")
            report.fail("benchmark section")
    report.line(f"\n**result: {'all passed' if not report.failures else 'FAILED: ' + '; '.join(report.failures)}**")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
