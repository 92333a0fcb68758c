"""Training-step benchmarks: the stock loop (zero_grad, mse_loss(model(x), y), backward, step)
against fusedtrain's fused step and fit, on the workloads of fusedtrain/workloads.py.

Groups:
    thermometer-adam-5000   5000 full-batch epochs of Adam (lr 0.1) on the tutorial's thermometer
    line-sgd-1000           nn.Linear(1, 1) on y = 2x + 1 + noise, SGD lr 0.01, 1000 epochs
    wide-65536x1024-1       one Adam step, x 65536 x 1024 -> 1
    wide-16384x1024-1024    one Adam step, x 16384 x 1024 -> 1024; extra_info "peak_rss_growth_MiB"
                            is the peak memory a fresh process adds during its first step
    mlp-fit-loader-5        the tutorial MLP 10-64-32-1 (ReLU), 5 epochs of 1000 rows from a shuffled
                            DataLoader (batch 32), Adam lr 1e-3: the tutorial loop, the same batches
                            pre-gathered with Adam(fused=True) (stock-prebatched-fused), fit(loader)
    mlp-step-32             one Adam step of that MLP on 32 rows (FusedTrainStep)
    two-layers-l1-1000      Linear(1, 2) -> Linear(2, 1), L1Loss, SGD lr 0.01, 1000 full-batch epochs
    wide-mlp-256            one Adam step of the MLP 1024-4096-4096-1024 (ReLU) on 256 rows, with
                            "peak_rss_growth_MiB" as above
Variants: stock (torch.optim for-loop), stock-fused (torch fused=True), stock-compile (the
forward and loss under torch.compile; thermometer only, where compiling pays for itself),
fusedtrain (fit, or FusedTrainStep for the one-step groups).

    pytest bench/test_train_step.py --benchmark-only
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedtrain
from fusedtrain import workloads

ADAM_LR = 0.1


def timed_fit(variant, make_model, make_data, optimizer, lr, epochs):
    """A function running one whole training from a fresh model (setup excluded by pedantic)."""
    x, y = make_data()

    def setup():
        model = make_model()
        cls = getattr(torch.optim if variant != "fusedtrain" else fusedtrain.optim, optimizer)
        kwargs = {"fused": True} if variant == "stock-fused" else {}
        opt = cls(model.parameters(), lr=lr, **kwargs)
        return (model, opt), {}

    if variant == "fusedtrain":
        def run(model, opt):
            fusedtrain.fit(model, opt, x, y, epochs=epochs)
    elif variant == "stock-compile":
        def run(model, opt):
            loss_fn = torch.compile(lambda a, b: torch.nn.functional.mse_loss(model(a), b))
            for _ in range(epochs):
                opt.zero_grad()
                loss_fn(x, y).backward()
                opt.step()
    else:
        def run(model, opt):
            workloads.stock_fit(model, opt, x, y, epochs)
    return setup, run


@pytest.mark.parametrize("variant", ["stock", "stock-fused", "stock-compile", "fusedtrain"])
def test_thermometer_adam_5000(benchmark, variant):
    benchmark.group = "thermometer-adam-5000"
    setup, run = timed_fit(variant, workloads.thermometer_model, workloads.thermometer, "Adam", ADAM_LR, 5000)
    benchmark.pedantic(run, setup=setup, rounds=3 if variant.startswith("stock") else 20)


@pytest.mark.parametrize("variant", ["stock", "stock-fused", "fusedtrain"])
def test_line_sgd_1000(benchmark, variant):
    benchmark.group = "line-sgd-1000"

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Linear(1, 1)

    setup, run = timed_fit(variant, make_model, workloads.noisy_line, "SGD", 0.01, 1000)
    benchmark.pedantic(run, setup=setup, rounds=3 if variant.startswith("stock") else 20)


def one_step(variant, n, inp, out, make_model=None):
    x, y = workloads.regression(n, inp, out)
    torch.manual_seed(0)
    model = make_model() if make_model is not None else torch.nn.Linear(inp, out)
    opt = (fusedtrain.optim.Adam if variant == "fusedtrain" else torch.optim.Adam)(
        model.parameters(), lr=1e-3, **({"fused": True} if variant == "stock-fused" else {}))
    if variant == "fusedtrain":
        step = fusedtrain.FusedTrainStep(model, opt)
        return lambda: step(x, y)
    return lambda: workloads.stock_step(model, opt, x, y)


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, fusedtrain
    from fusedtrain import workloads

    def peak_rss_kib():
        # VmHWM: the peak of this process image. getrusage's ru_maxrss would do, but Linux carries
        # it across exec from the forking parent, here the benchmark process with its gigabytes.
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    variant, model_name, n, inp, out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    # Plain random data: building it leaves no freed temporaries behind that would hide the
    # step's own peak under the process's earlier maximum.
    x, y = torch.empty(n, inp).normal_(), torch.empty(n, out).normal_()
    model = workloads.wide_mlp() if model_name == "wide_mlp" else torch.nn.Linear(inp, out)
    opt = (fusedtrain.optim.Adam if variant == "fusedtrain" else torch.optim.Adam)(model.parameters(), lr=1e-3)
    step = (fusedtrain.FusedTrainStep(model, opt) if variant == "fusedtrain"
            else lambda a, b: workloads.stock_step(model, opt, a, b))
    before = peak_rss_kib()
    step(x, y)
    after = peak_rss_kib()
    print(json.dumps({"peak_rss_growth_MiB": (after - before) / 1024, "data_MiB": (x.numel() + y.numel()) * 4 / 2**20}))
""")


def peak_growth(variant, n, inp, out, model="linear"):
    """Peak resident memory added by the first step, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, variant, model, str(n), str(inp), str(out)],
                            capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("variant", ["stock", "stock-fused", "fusedtrain"])
def test_wide_65536x1024_to_1(benchmark, variant):
    benchmark.group = "wide-65536x1024-1"
    step = one_step(variant, 65536, 1024, 1)
    step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["stock", "stock-fused", "fusedtrain"])
def test_wide_16384x1024_to_1024(benchmark, variant):
    benchmark.group = "wide-16384x1024-1024"
    benchmark.extra_info.update(peak_growth(variant.replace("-fused", ""), 16384, 1024, 1024))
    step = one_step(variant, 16384, 1024, 1024)
    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


def mlp_loader_fit(variant, epochs=5):
    """(setup, run) of one whole training of the tutorial MLP on the same shuffled batches."""
    x, y = workloads.nonlinear_data(1000)

    def setup():
        model = workloads.regression_mlp()
        if variant == "fusedtrain":
            opt = fusedtrain.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if "fused" in variant else {}))
        return (model, opt, workloads.shuffled_loader(x, y, batch_size=32)), {}

    def run(model, opt, loader):
        if variant == "fusedtrain":
            fusedtrain.fit(model, opt, loader, epochs=epochs)
        elif variant == "stock-prebatched-fused":  # the batches gathered first: no DataLoader in the loop
            batches = [(x[rows], y[rows]) for _ in range(epochs) for rows in
                       torch.randperm(len(x), generator=loader.generator).split(32)]
            for xb, yb in batches:
                workloads.stock_step(model, opt, xb, yb)
        else:
            workloads.stock_loader_fit(model, opt, loader, epochs)
    return setup, run


@pytest.mark.parametrize("variant", ["stock", "stock-prebatched-fused", "fusedtrain"])
def test_mlp_fit_loader_5(benchmark, variant):
    benchmark.group = "mlp-fit-loader-5"
    setup, run = mlp_loader_fit(variant)
    benchmark.pedantic(run, setup=setup, rounds=3 if variant.startswith("stock") else 20)


@pytest.mark.parametrize("variant", ["stock", "stock-fused", "fusedtrain"])
def test_mlp_step_32(benchmark, variant):
    benchmark.group = "mlp-step-32"
    x, y = workloads.nonlinear_data(32)
    model = workloads.regression_mlp()
    opt = (fusedtrain.optim.Adam if variant == "fusedtrain" else torch.optim.Adam)(
        model.parameters(), lr=1e-3, **({"fused": True} if variant == "stock-fused" else {}))
    step = (fusedtrain.FusedTrainStep(model, opt) if variant == "fusedtrain"
            else lambda a, b: workloads.stock_step(model, opt, a, b))
    step(x, y)
    benchmark.pedantic(step, args=(x, y), rounds=200, warmup_rounds=10)


@pytest.mark.parametrize("variant", ["stock", "fusedtrain"])
def test_two_layers_l1_1000(benchmark, variant):
    benchmark.group = "two-layers-l1-1000"
    x, y = workloads.noisy_line()
    criterion = torch.nn.L1Loss()

    def setup():
        model = workloads.two_layer_line()
        return (model, torch.optim.SGD(model.parameters(), lr=0.01)), {}

    def run(model, opt):
        if variant == "fusedtrain":
            fusedtrain.fit(model, opt, x, y, epochs=1000, criterion=criterion)
        else:
            workloads.stock_fit(model, opt, x, y, 1000, criterion)
    benchmark.pedantic(run, setup=setup, rounds=3 if variant == "stock" else 20)


@pytest.mark.parametrize("variant", ["stock", "stock-fused", "fusedtrain"])
def test_wide_mlp_256(benchmark, variant):
    benchmark.group = "wide-mlp-256"
    benchmark.extra_info.update(peak_growth(variant.replace("-fused", ""), 256, 1024, 1024, model="wide_mlp"))
    step = one_step(variant, 256, 1024, 1024, make_model=workloads.wide_mlp)
    step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
