"""FusedTrainStep and fit against the stock loop: zero_grad, mse_loss(model(x), y), backward, step;
and their backends against each other."""

import copy
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch

import fusedtrain
import fusedtrain.optim

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")

OPTIMIZERS = [
    ("SGD", {"lr": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "maximize": False}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "amsgrad": True}),
]


def option_id(value) -> str:
    """A test id for an optimizer's name or its keyword arguments."""
    return value if isinstance(value, str) else "-".join(f"{k}={w}" for k, w in value.items())


def stock_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def make_problem(n, inp, out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g, dtype=dtype)
    true_w = torch.randn(out, inp, generator=g, dtype=dtype)
    y = x @ true_w.T + 0.1 * torch.randn(n, out, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    model = torch.nn.Linear(inp, out, dtype=dtype)
    return x, y, model


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=option_id)
@pytest.mark.parametrize("flavour", ["torch", "fusedtrain"])
@pytest.mark.parametrize("shape", [(64, 5, 1), (40, 7, 3), (30, 6, 20)])  # fused rows and GEMM path
def test_fused_train_step_equals_the_stock_loop(name, kwargs, flavour, shape):
    x, y, stock_model = make_problem(*shape)
    fused_model = copy.deepcopy(stock_model)
    module = torch.optim if flavour == "torch" else fusedtrain.optim
    stock_opt = getattr(torch.optim, name)(stock_model.parameters(), foreach=False, **kwargs)
    fused_opt = getattr(module, name)(fused_model.parameters(), **kwargs)
    step = fusedtrain.FusedTrainStep(fused_model, fused_opt)
    for _ in range(200):
        want = stock_step(stock_model, stock_opt, x, y)
        got = step(x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(stock_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # the state is the optimizer's own: it continues in the stock loop
    stock_state = stock_opt.state_dict()["state"]
    for index, entries in fused_opt.state_dict()["state"].items():
        assert entries.keys() == stock_state[index].keys()


def test_fused_train_step_follows_a_tensor_lr_changed_in_place():
    x, y, stock_model = make_problem(40, 3, 1, seed=8)
    fused_model = copy.deepcopy(stock_model)
    stock_opt = torch.optim.Adam(stock_model.parameters(), lr=torch.tensor(0.1))
    fused_opt = fusedtrain.optim.Adam(fused_model.parameters(), lr=torch.tensor(0.1))
    step = fusedtrain.FusedTrainStep(fused_model, fused_opt)
    for _ in range(6):
        stock_step(stock_model, stock_opt, x, y)
        step(x, y)
        for opt in (stock_opt, fused_opt):
            opt.param_groups[0]["lr"].mul_(0.5)
    torch.testing.assert_close(list(fused_model.parameters()), list(stock_model.parameters()))


def test_fused_train_step_follows_the_scheduler_and_switches_back():
    x, y, stock_model = make_problem(50, 4, 1, seed=3)
    fused_model = copy.deepcopy(stock_model)
    stock_opt = torch.optim.Adam(stock_model.parameters(), lr=0.05)
    fused_opt = fusedtrain.optim.Adam(fused_model.parameters(), lr=0.05)
    stock_sched = torch.optim.lr_scheduler.StepLR(stock_opt, 10, 0.5)
    fused_sched = torch.optim.lr_scheduler.StepLR(fused_opt, 10, 0.5)
    step = fusedtrain.FusedTrainStep(fused_model, fused_opt)
    for i in range(60):
        stock_step(stock_model, stock_opt, x, y)
        if i < 30:
            step(x, y)
        else:
            stock_step(fused_model, fused_opt, x, y)  # back to the stock loop, same optimizer
        stock_sched.step()
        fused_sched.step()
    for a, b in zip(stock_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_fit_with_shuffled_batches_equals_the_stock_loop_on_the_same_permutations():
    x, y, stock_model = make_problem(103, 6, 2, seed=5)
    fused_model = copy.deepcopy(stock_model)
    stock_opt = torch.optim.SGD(stock_model.parameters(), lr=0.05, momentum=0.9)
    fused_opt = fusedtrain.optim.SGD(fused_model.parameters(), lr=0.05, momentum=0.9)
    stock_gen, fused_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    val_x, val_y = x[:20] + 0.5, y[:20]
    want_train, want_val = [], []
    for _ in range(15):
        order = torch.randperm(len(x), generator=stock_gen)
        losses = [stock_step(stock_model, stock_opt, x[b], y[b]) for b in order.split(16)]
        want_train.append(torch.stack(losses).mean())
        with torch.no_grad():
            want_val.append(torch.nn.functional.mse_loss(stock_model(val_x), val_y))
    history = fusedtrain.fit(fused_model, fused_opt, x, y, epochs=15, batch_size=16, shuffle=True,
                             generator=fused_gen, val=(val_x, val_y))
    torch.testing.assert_close(history.train_loss, torch.stack(want_train), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(history.val_loss, torch.stack(want_val), rtol=1e-5, atol=1e-6)
    for a, b in zip(stock_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


T_C = [0.5, 14.0, 15.0, 28.0, 11.0, 8.0, 3.0, -4.0, 6.0, 13.0, 21.0]
T_U = [35.7, 55.9, 58.2, 81.9, 56.3, 48.9, 33.9, 21.8, 48.4, 60.4, 68.4]


@pytest.mark.parametrize("name,lr,scale", [("Adam", 0.1, 1.0), ("SGD", 1e-2, 0.1)])
def test_thermometer_lands_where_the_stock_loop_lands(name, lr, scale):
    """t_c = w * t_u + b from w = 1, b = 0, 5000 epochs (the tutorials' thermometer)."""
    t_c = torch.tensor(T_C).unsqueeze(1)
    t_u = scale * torch.tensor(T_U).unsqueeze(1)
    models = []
    for _ in range(2):
        model = torch.nn.Linear(1, 1)
        with torch.no_grad():
            model.weight.fill_(1.0)
            model.bias.zero_()
        models.append(model)
    stock_opt = getattr(torch.optim, name)(models[0].parameters(), lr=lr)
    for _ in range(5000):
        loss = stock_step(models[0], stock_opt, t_u, t_c)
    history = fusedtrain.fit(models[1], getattr(fusedtrain.optim, name)(models[1].parameters(), lr=lr),
                             t_u, t_c, epochs=5000)
    torch.testing.assert_close(models[1].weight, models[0].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(models[1].bias, models[0].bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(history.train_loss[-1], loss, rtol=1e-4, atol=1e-5)


def test_linear_1_1_on_a_noisy_line():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 10, 100).unsqueeze(1)
    y = 2 * x + 1 + 0.5 * torch.randn(100, 1, generator=g)
    torch.manual_seed(1)
    stock_model = torch.nn.Linear(1, 1)
    fused_model = copy.deepcopy(stock_model)
    stock_opt = torch.optim.SGD(stock_model.parameters(), lr=0.01)
    for _ in range(1000):
        stock_step(stock_model, stock_opt, x, y)
    fusedtrain.fit(fused_model, fusedtrain.optim.SGD(fused_model.parameters(), lr=0.01), x, y, epochs=1000)
    for a, b in zip(stock_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert abs(fused_model.weight.item() - 2) < 0.2


def test_progress_prints_a_bar_and_gives_the_same_history(capsys):
    x, y, model = make_problem(20, 3, 1, seed=9)
    twin = copy.deepcopy(model)
    quiet = fusedtrain.fit(model, torch.optim.Adam(model.parameters(), lr=0.01), x, y, epochs=5)
    shown = fusedtrain.fit(twin, torch.optim.Adam(twin.parameters(), lr=0.01), x, y, epochs=5, progress=True)
    assert "5/5" in capsys.readouterr().err
    torch.testing.assert_close(shown.train_loss, quiet.train_loss)
    assert quiet.val_loss is None


def mutation_guard(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("case,error,match", [
    ("not_a_stack", TypeError, "FusedTrainStep: .*Dropout.* supported"),
    ("other_params", ValueError, "exactly the model's params"),
    ("rmsprop", TypeError, "must be SGD, Adam or AdamW"),
    ("x_shape", ValueError, r"x must have shape \(N, 3\)"),
    ("dtype", TypeError, "is torch.float64 on cpu but the model is torch.float32"),
    ("y_shape", ValueError, "does not broadcast to the prediction's shape"),
])
def test_bad_input_is_refused_before_anything_changes(case, error, match):
    x, y, model = make_problem(10, 3, 2, seed=11)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    stock_step(model, opt, x, y)
    before = mutation_guard(model, opt)
    with pytest.raises(error, match=match):
        if case == "not_a_stack":
            fusedtrain.FusedTrainStep(torch.nn.Sequential(model, torch.nn.Dropout()), opt)
        elif case == "other_params":
            fusedtrain.FusedTrainStep(model, torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]))
        elif case == "rmsprop":
            fusedtrain.FusedTrainStep(model, torch.optim.RMSprop(model.parameters()))
        elif case == "x_shape":
            fusedtrain.FusedTrainStep(model, opt)(torch.randn(10, 4), y)
        elif case == "dtype":
            fusedtrain.FusedTrainStep(model, opt)(x.double(), y)
        else:
            fusedtrain.fit(model, opt, x, torch.randn(10, 5), epochs=3)
    after = mutation_guard(model, opt)
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value)
    assert after[1]["state"][0]["step"] == before[1]["state"][0]["step"]


def test_target_that_broadcasts_warns_like_mse_loss():
    x, y, model = make_problem(8, 3, 2, seed=12)
    step = fusedtrain.FusedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(x, y[0])  # (2,) broadcasts over the rows
    assert any("Using a target size" in str(w.message) for w in caught)


def test_train_step_op_equals_fused_train_step():
    x, y, model = make_problem(20, 4, 1, seed=13)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = fusedtrain.FusedTrainStep(model, opt)
    params = [twin.weight, twin.bias]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    state = (zeros(), zeros(), [], [torch.tensor(0.0) for _ in params])
    spec = fusedtrain.stacks.describe(twin, torch.nn.MSELoss()).spec
    for _ in range(5):
        want = step(x, y)
        with torch.no_grad():
            got = torch.ops.fusedtrain.stack_adam_step_(x, y, params, *spec, *state, 0.01, 0.9, 0.999, 1e-8,
                                                        0.0, False, False, False)
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(twin.weight, model.weight)


# ---- backend= ----------------------------------------------------------------------------------

BACKEND_OPTIMIZERS = [
    ("Adam", {"lr": 0.05}),
    ("AdamW", {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
]


def train_with_backend(name, kwargs, backend, flavour=fusedtrain.optim):
    """A fresh model and optimizer: fit (shuffled batches of 16 and a last one of 7, validation),
    then 3 FusedTrainSteps; returns the losses, the model and the optimizer."""
    x, y, model = make_problem(39, 5, 2, seed=21)
    val = (x[:9] + 0.3, y[:9])
    opt = getattr(flavour, name)(model.parameters(), **kwargs)
    history = fusedtrain.fit(model, opt, x, y, epochs=3, batch_size=16, shuffle=True,
                             generator=torch.Generator().manual_seed(4), val=val, backend=backend)
    step = fusedtrain.FusedTrainStep(model, opt, backend=backend)
    losses = [history.train_loss, history.val_loss] + [step(x[:20], y[:20]) for _ in range(3)]
    return losses, model, opt


def assert_same_training(got, want, **tolerance):
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, **tolerance)
    for a, b in zip(got[1].parameters(), want[1].parameters()):
        torch.testing.assert_close(a, b, **tolerance)
    want_state = want[2].state_dict()["state"]
    for index, entries in got[2].state_dict()["state"].items():
        assert entries.keys() == want_state[index].keys()
        for key, value in entries.items():
            torch.testing.assert_close(value, want_state[index][key], **tolerance)


@pytest.mark.parametrize("name,kwargs", BACKEND_OPTIMIZERS, ids=option_id)
def test_auto_backend_follows_the_environment_and_the_step_loop_equals_the_native_loop(
        name, kwargs, monkeypatch):
    """FUSEDTRAIN_BACKEND=reference makes "auto" loop over the reference backend's train step;
    with the native op standing in for it, the loop's batches, shuffling, validation and
    history are the native loop's."""
    calls = []
    op_name = "stack_adam_step_" if name in ("Adam", "AdamW") else "stack_sgd_step_"

    def native_step(*args):
        calls.append(args[0].shape[0])
        return getattr(torch.ops.fusedtrain, op_name)(*args)

    want = train_with_backend(name, kwargs, "native", torch.optim)
    monkeypatch.setattr(fusedtrain.reference, op_name, native_step)
    monkeypatch.setenv("FUSEDTRAIN_BACKEND", "reference")
    assert not calls
    got = train_with_backend(name, kwargs, "auto", torch.optim)
    assert calls == [16, 16, 7] * 3 + [20] * 3
    assert_same_training(got, want)


@pytest.mark.parametrize("name,kwargs", BACKEND_OPTIMIZERS, ids=option_id)
def test_reference_backend_equals_native(name, kwargs):
    want = train_with_backend(name, kwargs, "native")
    got = train_with_backend(name, kwargs, "reference")
    assert_same_training(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,error,match", [
    ("unknown", ValueError, r"backend must be one of \('auto', 'native', 'triton', 'reference'\)"),
    ("triton_on_cpu", RuntimeError, "backend='triton' cannot run on cpu"),
    ("environment_triton", RuntimeError, "backend='triton' cannot run on cpu"),
    ("environment_unknown", ValueError, "FUSEDTRAIN_BACKEND must be one of"),
])
@pytest.mark.parametrize("caller", ["FusedTrainStep", "fit"])
def test_backend_that_cannot_run_is_refused_before_anything_changes(case, error, match, caller, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSEDTRAIN_BACKEND", raising=False)
    x, y, model = make_problem(10, 3, 2, seed=22)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend = {"unknown": "gpu-magic", "triton_on_cpu": "triton"}.get(case, "auto")
    step = fusedtrain.FusedTrainStep(model, opt) if case.startswith("environment") else None
    if case.startswith("environment"):  # read at each call, as by the optimizers' steps
        monkeypatch.setenv("FUSEDTRAIN_BACKEND", "triton" if case == "environment_triton" else "gpu")
    before = mutation_guard(model, opt)
    with pytest.raises(error, match=f"{caller}: {match}"):
        if caller == "fit":
            fusedtrain.fit(model, opt, x, y, epochs=2, backend=backend)
        elif step is not None:
            step(x, y)
        else:
            fusedtrain.FusedTrainStep(model, opt, backend=backend)
    after = mutation_guard(model, opt)
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value)
    assert after[1]["state"] == before[1]["state"] == {}


def test_without_the_extension_fit_runs_on_the_reference_backend():
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class HideExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fusedtrain._C":
                    raise ImportError("hidden for the test")

        sys.meta_path.insert(0, HideExtension())
        warnings.simplefilter("ignore")
        import torch, fusedtrain

        torch.manual_seed(0)
        x, y = torch.randn(30, 3), torch.randn(30, 1)
        stock, fused = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        fused.load_state_dict(stock.state_dict())
        opt = torch.optim.SGD(stock.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            opt.zero_grad(); torch.nn.functional.mse_loss(stock(x), y).backward(); opt.step()
        fused_opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
        fusedtrain.fit(fused, fused_opt, x, y, epochs=5)
        print(all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stock.parameters(), fused.parameters())))
        try:
            fusedtrain.fit(fused, fused_opt, x, y, epochs=5, backend="native")
        except RuntimeError as e:
            print(e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "FUSEDTRAIN_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=tempfile.gettempdir(), env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "True"
    assert lines[1].startswith("fit: backend='native' cannot run on cpu: the compiled extension")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_fit_on_an_empty_set_steps_once_per_epoch_like_the_stock_loop(backend):
    # The stock loop's order.split(len(X)) of no rows is one empty batch: a step on zero gradients.
    _, _, stock_model = make_problem(4, 3, 2, seed=9)
    fused_model = copy.deepcopy(stock_model)
    stock_opt = torch.optim.Adam(stock_model.parameters(), lr=0.1)
    fused_opt = fusedtrain.optim.Adam(fused_model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    stock_step(stock_model, stock_opt, x, y)  # moments to move by
    fusedtrain.FusedTrainStep(fused_model, fused_opt, backend=backend)(x, y)
    empty_x, empty_y = torch.randn(0, 3), torch.randn(0, 2)
    for _ in range(2):
        stock_step(stock_model, stock_opt, empty_x, empty_y)
    history = fusedtrain.fit(fused_model, fused_opt, empty_x, empty_y, epochs=2, backend=backend)
    assert history.train_loss.isnan().all()
    torch.testing.assert_close(list(fused_model.parameters()), list(stock_model.parameters()))
    assert fused_opt.state_dict()["state"][0]["step"] == stock_opt.state_dict()["state"][0]["step"] == 3
