"""The one-launch CUDA train step of narrow layer stacks (every width <= 128,
csrc/cuda/stack_narrow_cuda.cu) against fusedtrain.reference: every activation, loss and
optimizer setting, depths 1-4, widths 1-128, batches of 1, 33 and 65536 rows, fp32 and fp64; a
CUDA graph captured and replayed (two at once on two streams); two runs giving the same bits.
Skipped without a GPU and a CUDA build (bench/gpu_check.py runs these on a GPU machine).

Each case draws fresh random inputs, runs the same steps through the reference on the CPU in
fp64 (from the same starting values) and through torch.ops.fusedtrain on the GPU, and compares
the losses and the params after every step. fp32 is compared to the fp64 reference."""

import copy
import random

import pytest
import torch
from torch import nn

import fusedtrain
from fusedtrain import reference, stacks
from fusedtrain.stacks import Activation

# `gpu`: the tests that bench/gpu_check.py runs (pytest -m gpu).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and fusedtrain._extension.native_available()
         and fusedtrain._extension._C.has_cuda_kernels()),
    reason="needs a GPU and fusedtrain built with CUDA")]

ACTIVATIONS = {
    Activation.IDENTITY: nn.Identity,
    Activation.RELU: nn.ReLU,
    Activation.LEAKY_RELU: lambda: nn.LeakyReLU(0.07),
    Activation.TANH: nn.Tanh,
    Activation.SIGMOID: nn.Sigmoid,
    Activation.GELU: nn.GELU,
    Activation.GELU_TANH: lambda: nn.GELU(approximate="tanh"),
    Activation.SILU: nn.SiLU,
}
CRITERIA = {
    "mse": lambda: nn.MSELoss(),
    "l1-sum": lambda: nn.L1Loss(reduction="sum"),
    "smooth-l1": lambda: nn.SmoothL1Loss(beta=0.5),
    "huber-sum": lambda: nn.HuberLoss(delta=0.7, reduction="sum"),
    "cross-entropy": lambda: nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.1),
    "cross-entropy-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "bce-with-logits": lambda: nn.BCEWithLogitsLoss(),
}
# (kind, settings): the reference's and the op's hyperparameters after the state lists.
OPTIMIZERS = {
    "sgd": ("sgd", dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)),
    "sgd-momentum": ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                                 maximize=False)),
    "sgd-nesterov-wd": ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                                    maximize=False)),
    "sgd-dampening-maximize": ("sgd", dict(lr=0.01, momentum=0.5, dampening=0.3, weight_decay=0.0,
                                           nesterov=False, maximize=True)),
    "adam": ("adam", dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
                          amsgrad=False, maximize=False)),
    "adamw": ("adam", dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
                           amsgrad=False, maximize=False)),
    "adam-amsgrad-wd": ("adam", dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                     decoupled=False, amsgrad=True, maximize=False)),
    "adam-maximize": ("adam", dict(lr=0.001, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                   decoupled=False, amsgrad=False, maximize=True)),
}
# Tolerances of the GPU result against the fp64 reference.
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
DEVICE = "cuda"


def mlp(widths, activation, last_activation=False, bias=True):
    """A Sequential of Linear layers of the given widths, `activation` after each hidden one."""
    layers = []
    for l in range(len(widths) - 1):
        layers.append(nn.Linear(widths[l], widths[l + 1], bias=bias, dtype=torch.float64))
        if l < len(widths) - 2 or last_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def make_target(criterion, n, out, generator):
    if isinstance(criterion, nn.CrossEntropyLoss):
        return torch.randint(0, out, (n,), generator=generator)  # ignore_index=1 is hit too
    if isinstance(criterion, nn.BCEWithLogitsLoss):
        return torch.rand(n, out, generator=generator, dtype=torch.float64)
    return torch.randn(n, out, generator=generator, dtype=torch.float64)


class Run:
    """A model's params and optimizer state on one device and dtype, stepped by `step_fn`."""

    def __init__(self, model, criterion, optimizer, device, dtype):
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype)
        stack = stacks.describe(self.model, criterion)
        self.spec = stack.spec
        self.params = [p.detach() for p in stack.params()]
        self.kind, self.hyper = OPTIMIZERS[optimizer]
        zeros = lambda: [torch.zeros_like(p) for p in self.params]  # noqa: E731
        if self.kind == "adam":
            self.state = [zeros(), zeros(), zeros() if self.hyper["amsgrad"] else [],
                          [torch.zeros((), device=device, dtype=torch.float32) for _ in self.params]]
        else:
            self.state = [zeros() if self.hyper["momentum"] else []]
        self.first = True

    def step(self, ops, x, target):
        x = x.to(device=self.params[0].device, dtype=self.params[0].dtype)
        if target.is_floating_point():
            target = target.to(dtype=x.dtype)
        target = target.to(x.device)
        if self.kind == "adam":
            loss = ops.stack_adam_step_(x, target, self.params, *self.spec, *self.state, **self.hyper)
        else:
            loss = ops.stack_sgd_step_(x, target, self.params, *self.spec, *self.state, **self.hyper,
                                       first_step=self.first)
        self.first = False
        return loss


def check_steps(model, criterion, optimizer, dtype, batch, steps=2, seed=0):
    """`steps` steps on fresh random batches through the reference (CPU, fp64) and the CUDA op
    (dtype): the losses and the params after each step agree within TOLERANCES[dtype]."""
    want = Run(model, criterion, optimizer, "cpu", torch.float64)
    got = Run(model, criterion, optimizer, DEVICE, dtype)
    # Both start from the same values: the fp32 run's, for fp32.
    for w, g in zip(want.params, got.params):
        w.copy_(g.cpu().double())
    g = torch.Generator().manual_seed(seed)
    in_features, out = want.params[want.spec.layer_params[0]].shape[1], want.params[want.spec.layer_params[-1]].shape[0]
    tol = TOLERANCES[dtype]
    for step in range(steps):
        # Values the GPU's dtype holds exactly, so that both runs see the same batch.
        x = torch.randn(batch, in_features, generator=g, dtype=torch.float64).to(dtype).double()
        target = make_target(criterion, batch, out, g)
        if target.is_floating_point():
            target = target.to(dtype).double()
        want_loss = want.step(reference, x, target)
        got_loss = got.step(torch.ops.fusedtrain, x, target)
        assert got_loss.device.type == DEVICE and got_loss.dtype == dtype and got_loss.dim() == 0
        torch.testing.assert_close(got_loss.cpu().double(), want_loss, **tol, msg=lambda m: f"loss, step {step}: {m}")
        for i, (w, p) in enumerate(zip(want.params, got.params)):
            torch.testing.assert_close(p.cpu().double(), w, **tol, msg=lambda m: f"params[{i}], step {step}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("activation", list(ACTIVATIONS), ids=lambda a: a.name.lower())
def test_every_activation_and_loss_matches_the_reference(activation, criterion, dtype):
    # A random stack of depth 1-4 and widths 1-128 per case, the activation after every layer
    # (the last one too: its derivative meets the loss head's gradient), 33 rows.
    rng = random.Random(f"{activation}-{criterion}")
    depth = rng.randint(1, 4)
    widths = [rng.choice([1, 2, 7, 16, 33, 64, 100, 128]) for _ in range(depth + 1)]
    if criterion.startswith("cross-entropy"):
        widths[-1] = max(widths[-1], 3)  # ignore_index 1 is a class
    torch.manual_seed(rng.randint(0, 1000))
    model = mlp(widths, activation, last_activation=not criterion.startswith(("cross", "bce")))
    # SGD: the params move by lr times the gradient, so they compare the gradients themselves
    # (Adam's first step, lr g / (|g| + eps), turns a tiny gradient's rounding into lr).
    check_steps(model, CRITERIA[criterion](), "sgd-momentum", dtype, batch=33)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_setting_matches_the_reference(optimizer, dtype):
    torch.manual_seed(1)
    model = mlp([10, 64, 32, 1], Activation.RELU)  # the tutorial MLP
    check_steps(model, nn.MSELoss(), optimizer, dtype, batch=33, steps=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("widths,batch", [
    ([1, 1], 1),
    ([128, 128], 33),
    ([3, 128, 1], 1),
    ([128, 1, 128], 7),
    ([128, 128, 128, 128, 128], 33),  # depth 4 at the widest: weights staged layer by layer
    ([5, 17, 128, 9, 2], 300),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else f"batch{v}")
def test_depths_widths_and_batches(widths, batch, dtype):
    torch.manual_seed(2)
    # Tanh after the last layer too: depth 1 is then a stack for the narrow kernel, not the
    # linear + MSE case.
    model = mlp(widths, Activation.TANH, last_activation=True, bias=len(widths) % 2 == 0)
    check_steps(model, nn.MSELoss(), "sgd-momentum", dtype, batch=batch)


class Reused(nn.Module):
    """One nn.Linear applied twice: two layers share params, whose gradients add up."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 40, dtype=torch.float64)
        self.hidden = nn.Linear(40, 40, dtype=torch.float64)
        self.out = nn.Linear(40, 3, dtype=torch.float64)

    def forward(self, x):
        x = torch.nn.functional.silu(self.inp(x))
        x = torch.tanh(self.hidden(x))
        x = torch.nn.functional.leaky_relu(self.hidden(x), 0.2)
        return self.out(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_layer_applied_twice(dtype):
    torch.manual_seed(3)
    check_steps(Reused(), nn.CrossEntropyLoss(label_smoothing=0.05), "adam-amsgrad-wd", dtype, batch=70)


def test_a_large_batch():
    # The 64-64-64-1 ReLU stack on 65536 rows: many blocks, each many tiles. SGD, so that
    # the params compare the summed gradients: Adam's first steps from zero state move a param by
    # about lr whatever its gradient, so a gradient within fp32 rounding of zero could flip it.
    torch.manual_seed(4)
    check_steps(mlp([64, 64, 64, 1], Activation.RELU), nn.MSELoss(), "sgd-momentum", torch.float32, batch=65536)


def test_every_row_ignored_gives_a_nan_loss_and_no_update():
    # Cross entropy under "mean" with no row kept: 0 / 0 as torch, zero gradients (so Adam's
    # first step leaves the params where they were).
    torch.manual_seed(5)
    run = Run(mlp([4, 8, 3], Activation.RELU), nn.CrossEntropyLoss(ignore_index=2), "adam", DEVICE,
              torch.float32)
    before = [p.clone() for p in run.params]
    loss = run.step(torch.ops.fusedtrain, torch.randn(40, 4), torch.full((40,), 2))
    assert torch.isnan(loss).item()
    for b, p in zip(before, run.params):
        assert torch.equal(b, p)


@pytest.mark.parametrize("optimizer", ["adam-amsgrad-wd", "sgd-nesterov-wd"])
def test_a_narrow_step_is_one_kernel_launch(optimizer):
    torch.manual_seed(10)
    run = Run(mlp([10, 64, 32, 1], Activation.RELU), nn.MSELoss(), optimizer, DEVICE, torch.float32)
    x, y = torch.randn(1000, 10, device=DEVICE), torch.randn(1000, 1, device=DEVICE)
    run.step(torch.ops.fusedtrain, x, y)  # a first call sizes the grid
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run.step(torch.ops.fusedtrain, x, y)
        torch.cuda.synchronize()
    on_device = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(on_device) == 1 and "narrow_stack_step" in on_device[0], on_device


def large_run(seed):
    torch.manual_seed(seed)
    return Run(mlp([64, 64, 64, 1], Activation.RELU), nn.MSELoss(), "adam", DEVICE, torch.float32)


def test_two_runs_give_identical_bits():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(20000, 64, generator=g), torch.randn(20000, 1, generator=g)
    runs = [large_run(7), large_run(7)]
    losses = [[run.step(torch.ops.fusedtrain, x, y) for _ in range(3)] for run in runs]
    for a, b in zip(*losses):
        assert torch.equal(a, b)
    for a, b in zip(runs[0].params, runs[1].params):
        assert torch.equal(a, b)


@pytest.mark.concurrent_grids
def test_cuda_graph_capture_and_concurrent_replays():
    # Two steps captured in two graphs, replayed three times at once on two streams, end where
    # three eager steps of each end: the kernel keeps nothing between launches, and the two
    # replays share no scratch.
    g = torch.Generator().manual_seed(8)
    x = [torch.randn(5000, 64, generator=g).cuda() for _ in range(2)]
    y = [torch.randn(5000, 1, generator=g).cuda() for _ in range(2)]
    eager = [large_run(9 + i) for i in range(2)]
    captured = [large_run(9 + i) for i in range(2)]
    eager_losses = [[eager[i].step(torch.ops.fusedtrain, x[i], y[i]) for _ in range(3)] for i in range(2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graphs, losses = [], []
    for i in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                losses.append(captured[i].step(torch.ops.fusedtrain, x[i], y[i]))
        graphs.append(graph)
    torch.cuda.current_stream().wait_stream(side)
    # Capture ran nothing: the params have not moved yet.
    for a, b in zip(captured[0].params, large_run(9).params):
        assert torch.equal(a, b)
    streams = [torch.cuda.Stream() for _ in range(2)]
    replay_losses = [[], []]
    for _ in range(3):
        for i in range(2):
            streams[i].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[i]):
                graphs[i].replay()
                replay_losses[i].append(losses[i].clone())
    torch.cuda.synchronize()
    for i in range(2):
        for want, got in zip(eager_losses[i], replay_losses[i]):
            assert torch.equal(want, got)
        for want, got in zip(eager[i].params, captured[i].params):
            assert torch.equal(want, got)
        assert all(s.item() == 3.0 for s in captured[i].state[3])
