"""The native layer-stack ops (stack_fwd_bwd, stack_adam_step_, stack_sgd_step_) against the
plain-PyTorch reference and autograd, and FusedTrainStep / fit on stacks against the stock loop:
every activation x loss (classification heads included) x optimizer, depths 1-4, widths 1-300,
with and without biases; the tutorial MLP through fit(DataLoader); identical bits on every
instruction set and thread count; state_dict round trips; bad input refused before anything
changes."""

from __future__ import annotations

import copy
import itertools
import random
import zlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fusedtrain
from fusedtrain import reference, stacks
from helpers import SimpleModel

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")

OPS = torch.ops.fusedtrain
ACTIVATIONS = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "silu": nn.SiLU, "identity": nn.Identity,
}
LOSSES = {
    "mse": nn.MSELoss, "mse_sum": lambda: nn.MSELoss(reduction="sum"), "l1": nn.L1Loss,
    "smooth_l1": lambda: nn.SmoothL1Loss(beta=0.3), "huber_sum": lambda: nn.HuberLoss(reduction="sum", delta=0.4),
    "cross_entropy": lambda: nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
# name -> (optimizer class name, its arguments)
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.05}),
    "sgd_momentum": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    "sgd_nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": False}),
    "adam": ("Adam", {"lr": 0.01}),
    "adamw": ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    "adam_amsgrad": ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05, "maximize": True}),
}


def random_stack(seed: int, activation: str, dtype=torch.float64, depth=None, classes=None):
    """A stack of random depth (1-4) and widths (1-300), biases on some layers."""
    rng = random.Random(seed)
    depth = depth or rng.randint(1, 4)
    widths = [rng.choice([1, 3, 17, 64, 300]) for _ in range(depth)] + [classes or rng.choice([1, 2, 5])]
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=rng.random() < 0.7))
        if i < depth - 1:
            layers.append(ACTIVATIONS[activation]())
    torch.manual_seed(seed)
    return nn.Sequential(*layers).to(dtype), widths


def batch(widths, loss: str, n: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=dtype)
    if loss == "cross_entropy":
        return x, torch.randint(0, widths[-1], (n,), generator=g)
    if loss == "bce_with_logits":
        return x, torch.rand(n, widths[-1], generator=g, dtype=dtype)
    return x, torch.randn(n, widths[-1], generator=g, dtype=dtype)


def autograd_loss_and_grads(model, criterion, x, y):
    model.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| over a tensor or over all tensors of a list together (a gradient
    that cancels to nearly zero has no meaningful relative error of its own)."""
    if isinstance(want, (list, tuple)):
        got, want = torch.cat([g.reshape(-1) for g in got]), torch.cat([w.reshape(-1) for w in want])
    if want.numel() == 0:
        return 0.0
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_and_gradients_match_autograd(activation, loss):
    """fp64: relative error <= 1e-10 against autograd; fp32: <= 1e-5, or 4x the stock fp32
    loop's error against the same fp64 truth, whichever is larger."""
    seed = zlib.crc32(f"{activation}-{loss}".encode()) % 1000
    classes = 5 if loss == "cross_entropy" else None
    model64, widths = random_stack(seed, activation, torch.float64, classes=classes)
    criterion = LOSSES[loss]()
    x, y = batch(widths, loss, 50, torch.float64, seed)
    want_loss, want_grads = autograd_loss_and_grads(model64, criterion, x, y)
    stack = stacks.describe(model64, criterion)
    target = stacks.prepare_target(stack, x, y, "test")
    got_loss, got_grads = OPS.stack_fwd_bwd(x, target, [p.detach() for p in stack.params()], *stack.spec)
    assert len(got_grads) == len(want_grads)
    assert relative_error(got_loss, want_loss) <= 1e-10
    assert relative_error(got_grads, want_grads) <= 1e-10

    model32 = copy.deepcopy(model64).float()
    x32 = x.float()
    y32 = y if loss == "cross_entropy" else y.float()
    stock_loss, stock_grads = autograd_loss_and_grads(model32, criterion, x32, y32)
    stack32 = stacks.describe(model32, criterion)
    got_loss, got_grads = OPS.stack_fwd_bwd(x32, stacks.prepare_target(stack32, x32, y32, "test"),
                                            [p.detach() for p in stack32.params()], *stack32.spec)
    assert relative_error(got_loss, want_loss) <= max(1e-5, 4 * relative_error(stock_loss, want_loss))
    assert relative_error(got_grads, want_grads) <= max(1e-5, 4 * relative_error(stock_grads, want_grads))


class WideReusedModel(nn.Module):
    """A layer large enough for the GEMM path (150 x 150 weights), applied twice."""

    def __init__(self, bias: bool):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(6, 150), nn.Linear(150, 150, bias=bias), nn.Linear(150, 3)

    def forward(self, x):
        x = torch.tanh(self.hidden(torch.relu(self.inp(x))))
        return self.out(torch.sigmoid(self.hidden(x)))


@pytest.mark.parametrize("bias", [True, False])
def test_a_gemm_layer_applied_twice_adds_both_uses_over_several_steps(bias):
    """The GEMM path writes a gradient by its first use in a batch and adds the second use; each
    new batch starts over (three Adam steps against the stock loop, fp64)."""
    torch.manual_seed(3)
    fused = WideReusedModel(bias).double()
    stock = copy.deepcopy(fused)
    criterion = nn.SmoothL1Loss(beta=0.5)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    want_loss, want_grads = autograd_loss_and_grads(stock, criterion, x, y)
    stack = stacks.describe(fused, criterion)
    got_loss, got_grads = OPS.stack_fwd_bwd(x, y, [p.detach() for p in stack.params()], *stack.spec)
    assert relative_error(got_loss, want_loss) <= 1e-10
    assert relative_error(got_grads, want_grads) <= 1e-10
    stock_opt, fused_opt = torch.optim.Adam(stock.parameters(), lr=0.01), torch.optim.Adam(fused.parameters(), lr=0.01)
    step = fusedtrain.FusedTrainStep(fused, fused_opt, criterion)
    for start in (0, 10, 20):
        torch.testing.assert_close(step(x[start:start + 20], y[start:start + 20]),
                                   stock_step(stock, stock_opt, criterion, x[start:start + 20], y[start:start + 20]),
                                   rtol=1e-10, atol=0)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", ["mse", "l1", "cross_entropy", "bce_with_logits"])
def test_train_step_equals_the_stock_step(optimizer, loss):
    """FusedTrainStep for 4 steps against zero_grad, criterion(model(x), y).backward(), step() of
    torch.optim (for-loop), in float64: equal to rounding."""
    name, kwargs = OPTIMIZERS[optimizer]
    classes = 4 if loss == "cross_entropy" else None
    stock, widths = random_stack(7, "tanh", torch.float64, depth=3, classes=classes)
    fused = copy.deepcopy(stock)
    criterion = LOSSES[loss]()
    stock_opt = getattr(torch.optim, name)(stock.parameters(), foreach=False, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused.parameters(), **kwargs)
    step = fusedtrain.FusedTrainStep(fused, fused_opt, criterion)
    for k in range(4):
        x, y = batch(widths, loss, 33, torch.float64, seed=k)
        stock_opt.zero_grad()
        want = criterion(stock(x), y)
        want.backward()
        stock_opt.step()
        torch.testing.assert_close(step(x, y), want.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(stock.parameters(), fused.parameters()):
        for key, value in stock_opt.state[a].items():
            torch.testing.assert_close(fused_opt.state[b][key], value, rtol=1e-10, atol=1e-12)


def test_ops_equal_the_reference_ops():
    """The op and reference.stack_*_step_ on the same state: the same params, state and loss."""
    model, widths = random_stack(3, "silu", torch.float64, depth=3)
    stack = stacks.describe(model, nn.HuberLoss(delta=0.5))
    x, y = batch(widths, "huber", 40, torch.float64, 3)
    native = [p.detach().clone() for p in stack.params()]
    ref = [p.clone() for p in native]
    adam_state = lambda ps: ([torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],  # noqa: E731
                             [torch.zeros_like(p) for p in ps], [torch.tensor(2.0) for _ in ps])
    native_state, ref_state = adam_state(native), adam_state(ref)
    hyper = (0.01, 0.9, 0.99, 1e-8, 0.1, True, True, False)
    for _ in range(3):
        got = OPS.stack_adam_step_(x, y, native, *stack.spec, *native_state, *hyper)
        want = reference.stack_adam_step_(x, y, ref, *stack.spec, *ref_state, *hyper)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for got, want in zip(native + [t for s in native_state for t in s], ref + [t for s in ref_state for t in s]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def tutorial_data(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, torch.sin(x[:, :3].sum(1, keepdim=True)) + 0.05 * torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("loader_options", [
    {"shuffle": True}, {"shuffle": True, "drop_last": True}, {"shuffle": False},
    {"shuffle": True, "generator": "own"},
], ids=["shuffle", "shuffle-drop_last", "in-order", "shuffle-own-generator"])
@pytest.mark.parametrize("sampler_drawn", ["as-a-tensor", "by-iterating"])
def test_tutorial_mlp_fit_on_a_dataloader_equals_the_stock_loop(loader_options, sampler_drawn, monkeypatch):
    """5 epochs of the tutorial's SimpleModel, Adam, batches of 32 from a DataLoader: fit(loader)
    draws the very batches that iterating the loader draws, and lands on the stock loop's params
    to fp32 rounding; the global RNG is left where the stock loop leaves it. The same when a
    RandomSampler's draw is not reproduced as a tensor and fit iterates the sampler instead."""
    if sampler_drawn == "by-iterating":
        monkeypatch.setattr(fusedtrain.train, "_random_sampler_is_reproduced", lambda: False)
    x, y = tutorial_data()
    torch.manual_seed(1)
    stock = SimpleModel()
    fused = copy.deepcopy(stock)

    def loader():
        options = dict(loader_options)
        if options.get("generator") == "own":
            options["generator"] = torch.Generator().manual_seed(9)
        return DataLoader(TensorDataset(x, y), batch_size=32, **options)

    criterion = nn.MSELoss()
    stock_opt = torch.optim.Adam(stock.parameters(), lr=1e-3)
    torch.manual_seed(5)
    stock_loader = loader()
    want_losses = []
    for _ in range(5):
        losses = []
        for xb, yb in stock_loader:
            stock_opt.zero_grad()
            loss = criterion(stock(xb), yb)
            loss.backward()
            stock_opt.step()
            losses.append(loss.item())
        want_losses.append(sum(losses) / len(losses))
    after_stock = torch.randint(1 << 30, (1,))

    torch.manual_seed(5)
    history = fusedtrain.fit(fused, fusedtrain.optim.Adam(fused.parameters(), lr=1e-3), loader(), epochs=5,
                             criterion=criterion)
    assert torch.equal(torch.randint(1 << 30, (1,)), after_stock)
    torch.testing.assert_close(history.train_loss, torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class PairDataset(Dataset):
    """Not a TensorDataset: fit iterates the loader and runs each batch natively."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_fit_on_another_dataset_runs_the_loaders_batches():
    x, y = tutorial_data(200)
    torch.manual_seed(2)
    stock = nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 1))
    fused = copy.deepcopy(stock)
    stock_opt = torch.optim.SGD(stock.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(3)
    for _ in range(2):
        for xb, yb in DataLoader(PairDataset(x, y), batch_size=16, shuffle=True):
            stock_opt.zero_grad()
            nn.functional.l1_loss(stock(xb), yb).backward()
            stock_opt.step()
    torch.manual_seed(3)
    history = fusedtrain.fit(fused, torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9),
                             DataLoader(PairDataset(x, y), batch_size=16, shuffle=True), epochs=2,
                             criterion=nn.L1Loss(), val=(x[:50], y[:50]))
    assert history.train_loss.shape == (2,) and history.val_loss.shape == (2,)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fit_with_validation_and_classification_head():
    """Cross entropy over 3 classes with validation after each epoch, against the stock loop."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(4)
    stock = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3))
    fused = copy.deepcopy(stock)
    criterion = nn.CrossEntropyLoss()
    stock_opt = torch.optim.Adam(stock.parameters(), lr=0.01)
    perm_g = torch.Generator().manual_seed(8)
    val_losses = []
    for _ in range(3):
        for rows in torch.randperm(300, generator=perm_g).split(50):
            stock_opt.zero_grad()
            criterion(stock(x[rows]), y[rows]).backward()
            stock_opt.step()
        with torch.no_grad():
            val_losses.append(criterion(stock(x[:100]), y[:100]))
    history = fusedtrain.fit(fused, torch.optim.Adam(fused.parameters(), lr=0.01), x, y, epochs=3, batch_size=50,
                             shuffle=True, generator=torch.Generator().manual_seed(8), criterion=criterion,
                             val=(x[:100], y[:100]))
    torch.testing.assert_close(history.val_loss, torch.stack(val_losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def run_isa_and_threads(isa: str | None, threads: int):
    """A fit of a wide-enough stack whose batch spans several row blocks, on one ISA / thread count."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(20, 48), nn.GELU("tanh"), nn.Linear(48, 24), nn.SiLU(), nn.Linear(24, 3))
    x = torch.randn(3000, 20, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3000, 3, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if isa is not None:
            fusedtrain._extension._C.set_cpu_isa(isa)
        history = fusedtrain.fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, epochs=2, batch_size=1500,
                                 criterion=nn.SmoothL1Loss())
    finally:
        torch.set_num_threads(before)
    return [history.train_loss] + [p.detach().clone() for p in model.parameters()]


def test_every_instruction_set_and_thread_count_gives_the_same_bits():
    want = run_isa_and_threads("baseline", 1)
    for isa, threads in itertools.product(fusedtrain._extension._C.supported_cpu_isas(), (1, 2)):
        for got, expected in zip(run_isa_and_threads(isa, threads), want):
            assert torch.equal(got, expected), (isa, threads)


def test_state_dict_round_trips_to_torch_and_training_continues():
    x, y = tutorial_data(256)
    torch.manual_seed(6)
    fused = SimpleModel()
    stock = copy.deepcopy(fused)
    fused_opt = fusedtrain.optim.Adam(fused.parameters(), lr=1e-3, amsgrad=True)
    stock_opt = torch.optim.Adam(stock.parameters(), lr=1e-3, amsgrad=True)
    for _ in range(3):
        stock_opt.zero_grad()
        nn.functional.mse_loss(stock(x), y).backward()
        stock_opt.step()
    fusedtrain.fit(fused, fused_opt, x, y, epochs=3)
    moved = torch.optim.Adam(fused.parameters(), lr=1e-3, amsgrad=True)
    moved.load_state_dict(fused_opt.state_dict())
    for _ in range(2):
        for opt, model in ((stock_opt, stock), (moved, fused)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def stock_step(model, opt, criterion, x, y):
    opt.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("optimizer", ["adam_amsgrad", "sgd_momentum", "sgd"])
def test_repeated_fused_steps_follow_every_change_between_calls(optimizer, monkeypatch):
    """After its first call FusedTrainStep keeps what it checked (hyperparameters by value, the
    optimizer's state objects by identity): every change between calls must still be seen, and a
    batch the kept path cannot take must still be converted or refused by name."""
    name, kwargs = OPTIMIZERS[optimizer]
    torch.manual_seed(8)
    fused = SimpleModel().double()
    stock = copy.deepcopy(fused)
    fused_opt = getattr(torch.optim, name)(fused.parameters(), **kwargs)
    stock_opt = getattr(torch.optim, name)(stock.parameters(), **kwargs)
    criterion = nn.MSELoss()
    step = fusedtrain.FusedTrainStep(fused, fused_opt, criterion)
    x, y = tutorial_data(32)
    x, y = x.double(), y.double()

    def both(xb, yb):
        torch.testing.assert_close(step(xb, yb), stock_step(stock, stock_opt, criterion, xb, yb), rtol=1e-10, atol=0)

    def changes():
        yield lambda: None
        yield lambda: [g.__setitem__("lr", g["lr"] * 0.5) for o in (fused_opt, stock_opt) for g in o.param_groups]
        yield lambda: [g.__setitem__("weight_decay", 0.02) for o in (fused_opt, stock_opt) for g in o.param_groups]
        # the state replaced by a copy (load_state_dict), then one param's dict replaced
        yield lambda: fused_opt.load_state_dict(copy.deepcopy(stock_opt.state_dict()))
        yield lambda: fused_opt.state.__setitem__(fused.fc1.weight, copy.deepcopy(fused_opt.state[fused.fc1.weight]))
        # one state tensor replaced in its dict
        yield lambda: [d.__setitem__(k, v.clone()) for d in list(fused_opt.state.values())[:1] for k, v in list(d.items())[:1]]
        # a param's memory replaced (the kept buffers were built on the old one)
        yield lambda: setattr(fused.fc2.weight, "data", fused.fc2.weight.data.clone())
        yield lambda: monkeypatch.setenv("FUSEDTRAIN_BACKEND", "reference")
        yield lambda: monkeypatch.delenv("FUSEDTRAIN_BACKEND")
        yield lambda: fused_opt.state.clear() or stock_opt.state.clear()

    for change in changes():
        change()
        both(x, y)
        both(x, y)
    with pytest.warns(UserWarning, match="target size"):  # (1, 1) broadcasts over the rows: converted
        both(x, y[:1])
    before = [p.clone() for p in fused.parameters()]
    with pytest.raises(TypeError, match="FusedTrainStep: y is torch.float32 but the model is torch.float64"):
        step(x, y.float())
    with pytest.raises(ValueError, match=r"FusedTrainStep: x must have shape \(N, 10\)"):
        step(x[:, :3], y)
    for a, b in zip(before, fused.parameters()):
        assert torch.equal(a, b)
    both(x, y)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("op", ["stack_fwd_bwd", "stack_adam_step_", "stack_sgd_step_"])
def test_opcheck(op):
    model, widths = random_stack(1, "relu", torch.float32, depth=2)
    stack = stacks.describe(model, nn.MSELoss())
    x, y = batch(widths, "mse", 8, torch.float32, 1)
    params = [p.detach().clone() for p in stack.params()]
    if op == "stack_fwd_bwd":
        args = (x, y, params, *stack.spec)
    elif op == "stack_adam_step_":
        args = (x, y, params, *stack.spec, [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [], [torch.tensor(0.0) for _ in params],
                0.01, 0.9, 0.999, 1e-8, 0.0, False, False, False)
    else:
        args = (x, y, params, *stack.spec, [torch.zeros_like(p) for p in params], 0.01, 0.9, 0.0, 0.0,
                False, False, True)
    torch.library.opcheck(getattr(OPS, op), args, test_utils=("test_schema", "test_faketensor"))


def mutation_guard(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("case,error,match", [
    ("conv", TypeError, "Conv1d.*supported"),
    ("widths", ValueError, "takes 4 inputs but the layer before it"),
    ("x_width", ValueError, r"x must have shape \(N, 10\)"),
    ("x_dtype", TypeError, "x is torch.float64 on cpu but the model is torch.float32"),
    ("classes_dtype", TypeError, "class indices"),
    ("class_out_of_range", ValueError, "outside"),
    ("not_owned", ValueError, "exactly the model's params"),
    ("loader_items", TypeError, r"must yield \(x, y\) batches"),
    ("criterion", ValueError, "pos_weight"),
])
def test_bad_input_is_refused_before_anything_changes(case, error, match):
    x, y = tutorial_data(64)
    torch.manual_seed(0)
    model = SimpleModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    fusedtrain.fit(model, opt, x, y, epochs=1)  # state exists
    before = mutation_guard(model, opt)
    with pytest.raises(error, match=match):
        if case == "conv":
            fusedtrain.FusedTrainStep(nn.Sequential(nn.Conv1d(1, 1, 3), nn.Flatten()), opt)
        elif case == "widths":
            fusedtrain.FusedTrainStep(nn.Sequential(nn.Linear(10, 5), nn.Linear(4, 1)), opt)
        elif case == "x_width":
            fusedtrain.FusedTrainStep(model, opt)(torch.randn(64, 9), y)
        elif case == "x_dtype":
            fusedtrain.fit(model, opt, x.double(), y, epochs=1)
        elif case == "classes_dtype":
            classifier = nn.Sequential(nn.Linear(10, 3))
            fusedtrain.FusedTrainStep(classifier, torch.optim.SGD(classifier.parameters(), lr=0.1),
                                      nn.CrossEntropyLoss())(x, torch.rand(64, 3))
        elif case == "class_out_of_range":
            classifier = nn.Sequential(nn.Linear(10, 3))
            fusedtrain.FusedTrainStep(classifier, torch.optim.SGD(classifier.parameters(), lr=0.1),
                                      nn.CrossEntropyLoss())(x, torch.full((64,), 3))
        elif case == "not_owned":
            fusedtrain.fit(model, torch.optim.Adam(list(model.parameters())[:-1]), x, y, epochs=1)
        elif case == "loader_items":
            fusedtrain.fit(model, opt, DataLoader(PairDataset(x, y), batch_size=8, collate_fn=lambda b: b[0][0]),
                           epochs=1)
        else:
            fusedtrain.FusedTrainStep(model, opt, nn.BCEWithLogitsLoss(pos_weight=torch.ones(1)))
    after = mutation_guard(model, opt)
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value)
    for index, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after[1]["state"][index][key], value)


def test_ops_refuse_bad_layer_params_and_shapes_before_writing():
    model, widths = random_stack(2, "relu", torch.float32, depth=2)
    stack = stacks.describe(model, nn.MSELoss())
    params = [p.detach().clone() for p in stack.params()]
    x, y = batch(widths, "mse", 8, torch.float32, 2)
    spec = stack.spec
    with pytest.raises(ValueError, match="outside the"):
        OPS.stack_fwd_bwd(x, y, params, *spec._replace(layer_params=[0, 99]))
    with pytest.raises(ValueError, match="used by no layer"):
        OPS.stack_fwd_bwd(x, y, params + [torch.zeros(3)], *spec)
    with pytest.raises(ValueError, match=r"target must have shape"):
        OPS.stack_fwd_bwd(x, y[:, :0], params, *spec)
    with pytest.raises(ValueError, match="reduction"):
        OPS.stack_fwd_bwd(x, y, params, *spec._replace(reduction=0))
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="exp_avgs has"):
        OPS.stack_adam_step_(x, y, params, *spec, [], [], [], [], 0.01, 0.9, 0.999, 1e-8, 0.0, False, False, False)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
