"""fusedtrain.fit of a small stack on CUDA in ONE kernel launch (csrc/cuda/stack_fit_cuda.cu)
against the CPU's native loop: a DataLoader over a TensorDataset on the GPU, Adam and SGD with
momentum, params, optimizer state and per-epoch losses equal to fp32 rounding; one kernel launch
per fit call, counted with torch.profiler; a stack too large for one block taking the per-batch
loop; bad orders refused before anything is written. Skipped without a GPU and a CUDA build
(bench/gpu_check.py runs these on a GPU machine). The kernel's body also runs on CPU threads:
tests/test_fit_kernel_emulated.py."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fusedtrain
from fusedtrain import _extension, stacks

# `gpu`: the tests that bench/gpu_check.py runs (pytest -m gpu).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.native_available() and _extension._C.has_cuda_kernels()),
    reason="needs a GPU and fusedtrain built with CUDA")]

DEVICE = "cuda"
# The GPU and the CPU sum in different orders: fp32 rounding, grown over the fit's steps.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def tutorial_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))


def classifier():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 5))


def data(rows, in_features, target, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g)
    if target == "classes":
        return x, torch.randint(0, 5, (rows,), generator=g)
    return x, torch.randn(rows, 1, generator=g)


def fit_on(device, model, make_optimizer, criterion, x, y, val, epochs, **loader_options):
    """fit(loader) of a copy of model on `device`; (model, optimizer, history)."""
    model = copy.deepcopy(model).to(device)
    optimizer = make_optimizer(model.parameters())
    loader = DataLoader(TensorDataset(x.to(device), y.to(device)), generator=torch.Generator().manual_seed(5),
                        **loader_options)
    history = fusedtrain.fit(model, optimizer, loader, epochs=epochs, criterion=criterion,
                             val=tuple(t.to(device) for t in val), backend="native")
    return model, optimizer, history


def assert_same_fit(gpu, cpu):
    (gpu_model, gpu_opt, gpu_history), (cpu_model, cpu_opt, cpu_history) = gpu, cpu
    torch.testing.assert_close(gpu_history.train_loss.cpu(), cpu_history.train_loss, **TOLERANCE)
    torch.testing.assert_close(gpu_history.val_loss.cpu(), cpu_history.val_loss, **TOLERANCE)
    for (name, p), q in zip(gpu_model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), **TOLERANCE, msg=lambda m: f"{name}: {m}")
        gpu_state, cpu_state = gpu_opt.state[p], cpu_opt.state[q]
        assert gpu_state.keys() == cpu_state.keys()
        for key in cpu_state:
            torch.testing.assert_close(gpu_state[key].cpu().to(cpu_state[key].dtype), cpu_state[key], **TOLERANCE,
                                       msg=lambda m: f"{name} {key}: {m}")


def kernels_of(fn):
    """The names of the CUDA kernels fn() launches (copies and fills left out)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset"))]


def test_the_tutorial_mlp_with_adam_equals_the_cpu_loop():
    # The tutorial's loop: 1000 rows in shuffled batches of 32 (the last one of 8), 5 epochs.
    x, y = data(1000, 10, "values", 0)
    val = data(200, 10, "values", 1)
    runs = [fit_on(device, tutorial_mlp(), lambda p: torch.optim.Adam(p, lr=1e-3), nn.MSELoss(), x, y, val, 5,
                   batch_size=32, shuffle=True) for device in (DEVICE, "cpu")]
    assert_same_fit(*runs)


def test_a_classifier_with_sgd_momentum_and_drop_last_equals_the_cpu_loop():
    x, y = data(300, 6, "classes", 2)
    val = data(50, 6, "classes", 3)
    runs = [fit_on(device, classifier(), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
                   nn.CrossEntropyLoss(label_smoothing=0.1), x, y, val, 3, batch_size=16, shuffle=True,
                   drop_last=True) for device in (DEVICE, "cpu")]
    assert_same_fit(*runs)


def test_a_fit_is_one_kernel_launch():
    x, y = data(1000, 10, "values", 4)
    model = tutorial_mlp().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x.to(DEVICE), y.to(DEVICE)), batch_size=32, shuffle=True)
    fusedtrain.fit(model, optimizer, loader, epochs=1)  # creates the optimizer state
    launched = kernels_of(lambda: fusedtrain.fit(model, optimizer, loader, epochs=5))
    assert len(launched) == 1 and "stack_fit_kernel" in launched[0], launched


def test_which_stacks_and_batches_fit_one_block():
    def supported(model, rows, batch_size, state_lists=2):
        model = model.to(DEVICE)
        spec = _extension._C.StackSpec(*stacks.describe(model, nn.MSELoss()).spec)
        params = list(model.parameters())
        return _extension._C.stack_fit_supported_cuda(spec, params, torch.zeros(rows, params[0].shape[1],
                                                                               device=DEVICE),
                                                      batch_size, state_lists)

    assert supported(tutorial_mlp(), 1000, 32)
    assert supported(tutorial_mlp(), 1000, 32, state_lists=3)
    assert not supported(tutorial_mlp(), 100000, 0)  # the whole set as one batch: its activations do not fit
    assert not supported(nn.Sequential(nn.Linear(10, 200), nn.ReLU(), nn.Linear(200, 1)), 1000, 32)  # too wide


def test_a_stack_too_wide_for_one_block_takes_the_per_batch_loop():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(10, 200), nn.ReLU(), nn.Linear(200, 1))
    x, y = data(100, 10, "values", 7)
    val = data(20, 10, "values", 8)
    runs = [fit_on(device, model, lambda p: torch.optim.Adam(p, lr=1e-3), nn.MSELoss(), x, y, val, 2,
                   batch_size=32, shuffle=True) for device in (DEVICE, "cpu")]
    assert_same_fit(*runs)
    gpu_model, gpu_opt, _ = runs[0]
    loader = DataLoader(TensorDataset(x.to(DEVICE), y.to(DEVICE)), batch_size=32)
    launched = kernels_of(lambda: fusedtrain.fit(gpu_model, gpu_opt, loader, epochs=1))
    assert len(launched) > 1 and not any("stack_fit_kernel" in name for name in launched), launched


def test_orders_outside_the_rows_are_refused_before_anything_is_written():
    model = tutorial_mlp().to(DEVICE)
    params = [p.detach() for p in model.parameters()]
    before = [p.clone() for p in params]
    spec = _extension._C.StackSpec(*stacks.describe(model, nn.MSELoss()).spec)
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    x, y = (t.to(DEVICE) for t in data(10, 10, "values", 9))
    orders = torch.arange(10).reshape(1, 10)
    orders[0, 3] = 10
    hyper = _extension._C.AdamHyper()
    hyper.lr, hyper.beta1, hyper.beta2, hyper.eps = 1e-3, 0.9, 0.999, 1e-8
    hyper.weight_decay, hyper.decoupled, hyper.amsgrad, hyper.maximize = 0.0, False, False, False
    fit_data = _extension._C.FitData(x, y, 1, 4, orders, None, None, None)
    with pytest.raises(IndexError, match="orders holds row 10"):
        _extension._C.stack_fit_adam_cuda(fit_data, params, spec, zeros(), zeros(), [], steps, hyper)
    for b, p in zip(before, params):
        assert torch.equal(b, p)
    assert all(s.item() == 0 for s in steps)
