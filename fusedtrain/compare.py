"""`python -m fusedtrain compare`: the built-in workloads timed on this machine's CPU, the stock
PyTorch code against the same code with fusedtrain swapped in.

stock: torch.optim with its default arguments (on CPU, its for-loop implementation) in the loop
the tutorials write. fused: fusedtrain.optim in the same loop, or fusedtrain.fit / FusedTrainStep
where the model is one nn.Linear with an MSE loss. After a warm-up of each, stock and fused runs
alternate in this process and the table shows their medians; speedup = stock / fused. Both start
from the same params and data, and "max abs diff" is the largest difference between their final
params. On 2 cores --quick takes under 30 s (a minute when other work shares them), the full run
about twice as long; --smoke runs every workload once at toy sizes, to check that everything
runs and agrees (its times mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, NamedTuple, TextIO

import torch
from torch import Tensor

import fusedtrain
from fusedtrain import _extension, workloads

STOCK, FUSED = "stock", "fused"
SIZES = ("smoke", "quick", "full")
COLUMNS = ("workload", "stock", "fused", "speedup", "max abs diff")
OPTIMIZER_ARGS = {"Adam": {"lr": 1e-3}, "SGD": {"lr": 1e-3, "momentum": 0.9}}


class Trial(NamedTuple):
    """One variant's copy of a workload: `run` is the timed work, `params` the tensors it trains."""

    run: Callable[[], object]
    params: list[Tensor]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    # Builds the data and the initial params (untimed); returns variant -> a fresh Trial from them.
    prepare: Callable[[], Callable[[str], Trial]]
    repeats: int
    # True: every timed run trains a fresh Trial from the start. False: one Trial per variant
    # keeps stepping, so the times are of the steady state after the warm-up step.
    whole_training: bool


@dataclasses.dataclass(frozen=True)
class Result:
    workload: str
    description: str
    stock_s: float  # medians
    fused_s: float
    speedup: float
    max_abs_diff: float
    repeats: int
    stock_times_s: list[float]
    fused_times_s: list[float]


def _params(model: torch.nn.Module) -> list[Tensor]:
    return list(model.parameters())


def _fit(name: str, description: str, make_model, make_data, optimizer: str, lr: float, epochs: int,
         repeats: int) -> Workload:
    """Full-batch training: the stock loop against fusedtrain.fit."""
    def prepare():
        x, y = make_data()
        initial = make_model()

        def start(variant):
            model = copy.deepcopy(initial)
            if variant == STOCK:
                opt = getattr(torch.optim, optimizer)(model.parameters(), lr=lr)
                return Trial(functools.partial(workloads.stock_fit, model, opt, x, y, epochs), _params(model))
            opt = getattr(fusedtrain.optim, optimizer)(model.parameters(), lr=lr)
            return Trial(functools.partial(fusedtrain.fit, model, opt, x, y, epochs=epochs), _params(model))
        return start
    return Workload(name, description, prepare, repeats, whole_training=True)


def _regression_step(n: int, inp: int, out: int, repeats: int) -> Workload:
    """One Adam step of nn.Linear + MSE: zero_grad, forward, loss, backward, step against FusedTrainStep."""
    def prepare():
        x, y = workloads.regression(n, inp, out)
        initial = workloads.linear(inp, out)

        def start(variant):
            model = copy.deepcopy(initial)
            if variant == STOCK:
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                return Trial(functools.partial(workloads.stock_step, model, opt, x, y), _params(model))
            step = fusedtrain.FusedTrainStep(model, fusedtrain.optim.Adam(model.parameters(), lr=1e-3))
            return Trial(functools.partial(step, x, y), _params(model))
        return start
    return Workload(f"wide-{n}x{inp}-{out}",
                    f"one Adam step (lr 1e-3) of nn.Linear({inp}, {out}) + MSE on {n} rows: "
                    "zero_grad, forward, loss, backward, step against FusedTrainStep",
                    prepare, repeats, whole_training=False)


def _optimizer_step(optimizer: str, shape: str, repeats: int) -> Workload:
    """optimizer.step() on params whose grads were set once: torch.optim against fusedtrain.optim."""
    def prepare():
        params, grads = workloads.optimizer_tensors(shape)

        def start(variant):
            trained = [torch.nn.Parameter(p.clone()) for p in params]
            for p, g in zip(trained, grads):
                p.grad = g.clone()
            opt = getattr(torch.optim if variant == STOCK else fusedtrain.optim, optimizer)
            return Trial(opt(trained, **OPTIMIZER_ARGS[optimizer]).step, trained)
        return start
    count, size = shape.split("x")
    args = ", ".join(f"{k} {v:g}" for k, v in OPTIMIZER_ARGS[optimizer].items())
    return Workload(f"{optimizer.lower()}-fp32-{shape}",
                    f"{optimizer}({args}).step() on {count} fp32 tensor(s) of {size} elements: "
                    "torch.optim (default arguments) against fusedtrain.optim",
                    prepare, repeats, whole_training=False)


def _mlp(epochs: int, repeats: int, n: int = 1000) -> Workload:
    """The tutorials' mini-batch loop, once with torch.optim.Adam and once with fusedtrain's."""
    def prepare():
        x, y = workloads.nonlinear_data(n)
        initial = workloads.regression_mlp()

        def start(variant):
            model = copy.deepcopy(initial)
            opt = (torch.optim if variant == STOCK else fusedtrain.optim).Adam(model.parameters(), lr=1e-3)
            loader = workloads.shuffled_loader(x, y, batch_size=32)  # the same batches for both variants
            return Trial(functools.partial(workloads.stock_loader_fit, model, opt, loader, epochs), _params(model))
        return start
    return Workload(f"mlp-10-64-32-1-adam-{epochs}",
                    f"MLP 10-64-32-1 (ReLU), DataLoader(batch_size=32, shuffle=True) over {n} rows, MSELoss, "
                    f"Adam lr 1e-3, {epochs} epochs: the same loop with torch.optim.Adam and fusedtrain.optim.Adam",
                    prepare, repeats, whole_training=True)


def _mlp_fit_loader(epochs: int, repeats: int, n: int = 1000) -> Workload:
    """The tutorial's mini-batch loop against fusedtrain.fit on the same DataLoader."""
    def prepare():
        x, y = workloads.nonlinear_data(n)
        initial = workloads.regression_mlp()

        def start(variant):
            model = copy.deepcopy(initial)
            loader = workloads.shuffled_loader(x, y, batch_size=32)  # the same batches for both variants
            if variant == STOCK:
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                return Trial(functools.partial(workloads.stock_loader_fit, model, opt, loader, epochs), _params(model))
            opt = fusedtrain.optim.Adam(model.parameters(), lr=1e-3)
            return Trial(functools.partial(fusedtrain.fit, model, opt, loader, epochs=epochs), _params(model))
        return start
    return Workload(f"mlp-fit-loader-{epochs}",
                    f"MLP 10-64-32-1 (ReLU), DataLoader(batch_size=32, shuffle=True) over {n} rows, MSELoss, "
                    f"Adam lr 1e-3, {epochs} epochs: the tutorial loop against fusedtrain.fit(model, opt, loader)",
                    prepare, repeats, whole_training=True)


def _stack_step(name: str, description: str, make_model, x: Tensor, y: Tensor, repeats: int) -> Workload:
    """One Adam step of a stack under MSE: the stock step with Adam(fused=True) against FusedTrainStep."""
    def prepare():
        initial = make_model()

        def start(variant):
            model = copy.deepcopy(initial)
            if variant == STOCK:
                opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
                return Trial(functools.partial(workloads.stock_step, model, opt, x, y), _params(model))
            step = fusedtrain.FusedTrainStep(model, fusedtrain.optim.Adam(model.parameters(), lr=1e-3))
            return Trial(functools.partial(step, x, y), _params(model))
        return start
    return Workload(name, description, prepare, repeats, whole_training=False)


def _l1_two_layers(epochs: int, repeats: int) -> Workload:
    """The tutorial's Linear(1, 2) -> Linear(2, 1) under L1Loss with SGD, full batch."""
    def prepare():
        x, y = workloads.noisy_line()
        initial = workloads.two_layer_line()

        def start(variant):
            model = copy.deepcopy(initial)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            if variant == STOCK:
                return Trial(functools.partial(workloads.stock_fit, model, opt, x, y, epochs, torch.nn.L1Loss()),
                             _params(model))
            return Trial(functools.partial(fusedtrain.fit, model, opt, x, y, epochs=epochs, criterion=torch.nn.L1Loss()),
                         _params(model))
        return start
    return Workload(f"two-layers-l1-{epochs}",
                    f"y = 2x + 1 + noise on 100 points, Linear(1, 2) -> Linear(2, 1), L1Loss, SGD lr 0.01, {epochs} "
                    "full-batch epochs: stock loop against fusedtrain.fit",
                    prepare, repeats, whole_training=True)


def all_workloads(size: str) -> list[Workload]:
    """The workloads of a run: "quick", "full", or "smoke" (toy sizes, one repeat)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")

    def pick(smoke, quick, full):
        return {"smoke": smoke, "quick": quick, "full": full}[size]

    thermometer_epochs, line_epochs = pick(50, 5000, 5000), pick(10, 1000, 1000)
    optimizer_shapes = pick({"1x1e3": 1, "10x1e2": 1},
                            {"1x1e6": 21, "100x1e3": 21},
                            {"1x1e6": 51, "100x1e3": 51, "1x1e7": 11, "100x1e5": 11})
    return [
        _fit(f"thermometer-adam-{thermometer_epochs}",
             f"the thermometer of 'Deep Learning with PyTorch', t_c = w * t_u + b with nn.Linear(1, 1) from "
             f"w = 1, b = 0, Adam lr 0.1, {thermometer_epochs} full-batch epochs: stock loop against fusedtrain.fit",
             workloads.thermometer_model, workloads.thermometer, "Adam", 0.1, thermometer_epochs, pick(1, 3, 7)),
        _fit(f"line-sgd-{line_epochs}",
             f"y = 2x + 1 + noise on 100 points, nn.Linear(1, 1), SGD lr 0.01, {line_epochs} full-batch epochs: "
             "stock loop against fusedtrain.fit",
             functools.partial(workloads.linear, 1, 1), workloads.noisy_line, "SGD", 0.01, line_epochs,
             pick(1, 5, 11)),
        _regression_step(*pick((256, 64, 1), (65536, 1024, 1), (65536, 1024, 1)), repeats=pick(1, 11, 21)),
        _regression_step(*pick((128, 64, 64), (16384, 1024, 1024), (16384, 1024, 1024)), repeats=pick(1, 5, 9)),
        *(_optimizer_step(optimizer, shape, repeats)
          for shape, repeats in optimizer_shapes.items() for optimizer in OPTIMIZER_ARGS),
        _mlp(epochs=pick(1, 5, 20), repeats=pick(1, 3, 7)),
        _mlp_fit_loader(epochs=pick(1, 5, 20), repeats=pick(1, 3, 7)),
        _stack_step("mlp-step-10-64-32-1", "one Adam step of the MLP 10-64-32-1 (ReLU) + MSE on a batch of 32: "
                    "zero_grad, forward, loss, backward, Adam(fused=True).step() against FusedTrainStep",
                    workloads.regression_mlp, *workloads.nonlinear_data(32), repeats=pick(1, 51, 101)),
        _l1_two_layers(epochs=pick(10, 1000, 1000), repeats=pick(1, 5, 11)),
        _stack_step(f"wide-mlp-1024-4096-4096-1024-{pick(8, 256, 256)}",
                    f"one Adam step of the MLP 1024-4096-4096-1024 (ReLU) + MSE on a batch of {pick(8, 256, 256)}: "
                    "stock step with Adam(fused=True) against FusedTrainStep",
                    workloads.wide_mlp, *workloads.regression(pick(8, 256, 256), 1024, 1024), repeats=pick(1, 3, 7)),
    ]


def select(candidates: list[Workload], only: str | None) -> list[Workload]:
    """The workloads whose name contains any of the comma-separated parts of `only` (all if None)."""
    if only is None:
        return candidates
    parts = [part.strip() for part in only.split(",") if part.strip()]
    chosen = [w for w in candidates if any(part in w.name for part in parts)]
    if not chosen:
        raise ValueError(f"--only {only!r} matches no workload; the workloads are: "
                         + ", ".join(w.name for w in candidates))
    return chosen


def _timed(run: Callable[[], object]) -> float:
    # As timeit does: a garbage collection inside one run would be charged to that run alone.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def measure(workload: Workload, progress: TextIO | None = None) -> Result:
    """Warm-up, then `repeats` interleaved timed runs of each variant; the medians and the largest
    difference between the two variants' final params (after the same number of runs)."""
    start = workload.prepare()
    last = {}
    for variant in (STOCK, FUSED):  # warm-up: first calls, allocations, the optimizer state
        last[variant] = start(variant)
        last[variant].run()
    steppers = dict(last)
    times = {STOCK: [], FUSED: []}
    for repeat in range(workload.repeats):
        # Alternating who goes first, so that a change in the machine's speed favours neither.
        for variant in (STOCK, FUSED) if repeat % 2 == 0 else (FUSED, STOCK):
            trial = start(variant) if workload.whole_training else steppers[variant]
            times[variant].append(_timed(trial.run))
            last[variant] = trial
        if progress is not None:
            progress.write(".")
            progress.flush()
    diff = max((a.detach().double() - b.detach().double()).abs().max().item()
               for a, b in zip(last[STOCK].params, last[FUSED].params, strict=True))
    stock, fused = statistics.median(times[STOCK]), statistics.median(times[FUSED])
    return Result(workload.name, workload.description, stock, fused, stock / fused, diff,
                  workload.repeats, times[STOCK], times[FUSED])


def run(chosen: list[Workload], progress: TextIO | None = None) -> list[Result]:
    results = []
    began = time.perf_counter()
    for i, workload in enumerate(chosen, 1):
        if progress is not None:
            progress.write(f"[{i}/{len(chosen)}] {workload.name} ")
            progress.flush()
        results.append(measure(workload, progress))
        if progress is not None:
            r = results[-1]
            progress.write(f" stock {format_time(r.stock_s)}, fused {format_time(r.fused_s)}, "
                           f"speedup {r.speedup:.2f}x ({time.perf_counter() - began:.0f} s so far)\n")
    return results


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} us"


def table(results: list[Result]) -> str:
    """A Markdown table, padded so that it also reads in a terminal."""
    rows = [COLUMNS] + [(r.workload, format_time(r.stock_s), format_time(r.fused_s), f"{r.speedup:.2f}x",
                         f"{r.max_abs_diff:.2g}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def machine() -> dict:
    """What the times were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine makes the times noisy: the 1-minute load average before the
        # run says how much.
        "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "cpu_isa": _extension._C.cpu_isa() if _extension.native_available() else None,
        "torch": torch.__version__,
        "fusedtrain": fusedtrain.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def describe(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, load average "
            f"{m['load_average']}), torch {m['torch']}, fusedtrain {m['fusedtrain']} (CPU kernels: "
            f"{m['cpu_isa']}), python {m['python']}, {m['date']}")


def plot(results: list[Result], path: str, title: str) -> None:
    """A horizontal bar per workload from 1 to its speedup, on a log scale."""
    # Figure with the Agg canvas rather than pyplot: no GUI backend, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.workload for r in reversed(results)]  # barh draws bottom-up; keep the table's order
    speedups = [r.speedup for r in reversed(results)]
    fig = Figure(figsize=(9, 1.6 + 0.38 * len(results)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.barh(names, [s - 1 for s in speedups], left=1,
                   color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.bar_label(bars, labels=[f"{s:.2f}x" for s in speedups], padding=3, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(speedups) / 2), max(4.0, max(speedups) * 4))
    ax.axvline(1, color="black", linewidth=0.8)
    ax.set_xlabel("speedup = stock time / fused time (median, log scale)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="fewer repeats and sizes: under 30 s on 2 idle cores")
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="every workload once at toy sizes: checks that all runs and agrees, times mean nothing")
    parser.set_defaults(size="full")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated parts of workload names: run the workloads whose name contains "
                             "any of them (e.g. --only thermometer,adam-)")
    parser.add_argument("--list", action="store_true", help="list the workloads (of the chosen size) and exit")
    parser.add_argument("--json", metavar="FILE", help="also write the machine and the rows as JSON")
    parser.add_argument("--plot", metavar="FILE", help="also write a bar chart of the speedups (PNG; needs matplotlib)")


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs `compare` from parsed arguments; bad arguments exit through parser.error before any work."""
    try:
        chosen = select(all_workloads(args.size), args.only)
    except ValueError as error:
        parser.error(str(error))
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option} {path}: the directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    if args.list:
        for w in chosen:
            print(f"{w.name}: {w.description}")
        return 0
    if not _extension.native_available():
        print(f"compare times fusedtrain's native kernels, but the compiled extension is not available: "
              f"{_extension.LOAD_ERROR}", file=sys.stderr)
        return 1

    options = {"full": "", "quick": " --quick", "smoke": " --smoke"}[args.size]
    options += f" --only {args.only}" if args.only is not None else ""
    m = machine()
    if m["load_average"] is not None and m["load_average"] >= m["cores"]:
        print(f"warning: load average {m['load_average']} on {m['cores']} cores before the run: other work "
              "shares the CPU, so the times will be noisy", file=sys.stderr)
    began = time.perf_counter()
    results = run(chosen, progress=sys.stderr)
    print(f"done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    print(f"python -m fusedtrain compare{options} on {describe(m)}\n")
    print(table(results))
    if args.json is not None:
        rows = [dataclasses.asdict(r) for r in results]
        with open(args.json, "w") as out:
            json.dump({"command": f"python -m fusedtrain compare{options}", "size": args.size, "machine": m,
                       "rows": rows}, out, indent=1)
            out.write("\n")
    if args.plot is not None:
        plot(results, args.plot, f"python -m fusedtrain compare{options}: stock PyTorch vs fusedtrain\n"
                                 f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}")
    return 0
