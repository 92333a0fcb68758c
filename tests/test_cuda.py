"""The CUDA kernels on a GPU: the same agreement as on the CPU. Skipped without a GPU and a CUDA
build (CI has neither; bench/gpu_check.py runs these on a GPU machine)."""

import pytest
import torch

import fusedtrain
from fusedtrain import reference

# `gpu`: the tests that bench/gpu_check.py runs (pytest -m gpu).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and fusedtrain._extension.native_available()
         and fusedtrain._extension._C.has_cuda_kernels()),
    reason="needs a GPU and fusedtrain built with CUDA")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(3, 5), (70001,), (), (0,), (129,)]


def random_lists(dtype, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(count)]


def to_cuda(lists):
    return [[t.cuda() for t in lst] for lst in lists]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad,decoupled,scaled", [(False, False, False), (True, True, False), (False, False, True)])
def test_adam_kernel_matches_reference(dtype, amsgrad, decoupled, scaled):
    params, grads, exp_avgs = random_lists(dtype, 3, 0)
    exp_avg_sqs = [t.abs() for t in random_lists(dtype, 1, 1)[0]]
    max_sqs = [t * 1.5 for t in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(3.0) for _ in SHAPES]
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=decoupled,
                 amsgrad=amsgrad, maximize=False)
    amp = {"grad_scale": torch.tensor(64.0), "found_inf": torch.tensor(0.0)} if scaled else {}
    cpu = [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps]
    gpu = to_cuda(cpu)
    reference.adam_step_(*cpu, **hyper, **amp)
    torch.ops.fusedtrain.adam_step_(*gpu, **hyper, **{k: v.cuda() for k, v in amp.items()})
    tol = {} if dtype in (torch.float32, torch.float64) else {"atol": 1e-2, "rtol": 1e-2}
    for want, got in zip(cpu, gpu):
        for w, g in zip(want, got):
            torch.testing.assert_close(g.cpu(), w, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first_step,nesterov", [(True, False), (False, True)])
def test_sgd_kernel_matches_reference(dtype, first_step, nesterov):
    cpu = random_lists(dtype, 3, 2)
    gpu = to_cuda(cpu)
    hyper = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=nesterov,
                 maximize=True, first_step=first_step)
    reference.sgd_step_(*cpu, **hyper)
    torch.ops.fusedtrain.sgd_step_(*gpu, **hyper)
    tol = {} if dtype in (torch.float32, torch.float64) else {"atol": 1e-2, "rtol": 1e-2}
    for want, got in zip(cpu, gpu):
        for w, g in zip(want, got):
            torch.testing.assert_close(g.cpu(), w, **tol)


@pytest.mark.parametrize("name,kwargs", [("Adam", {"amsgrad": True}), ("AdamW", {}), ("SGD", {"lr": 0.01, "momentum": 0.9})])
def test_optimizer_on_cuda_agrees_with_torch_fused(name, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).cuda()
    twin.load_state_dict(model.state_dict())
    ours = getattr(fusedtrain.optim, name)(model.parameters(), **kwargs)
    theirs = getattr(torch.optim, name)(twin.parameters(), fused=True, **kwargs)
    x, y = torch.randn(128, 64, device="cuda"), torch.randn(128, 1, device="cuda")
    for _ in range(100):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# (40, 70000, 3): few rows, many columns, so the fused kernel splits the columns over its blocks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,inp,out", [(1, 3, 1), (1000, 64, 16), (5000, 1024, 1), (40, 70000, 3),
                                       (700, 20, 128)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_mse_kernel_matches_reference(dtype, n, inp, out, has_bias):
    g = torch.Generator().manual_seed(n + inp + out)
    args = [torch.randn(n, inp, generator=g, dtype=torch.float64), torch.randn(out, inp, generator=g, dtype=torch.float64),
            torch.randn(out, generator=g, dtype=torch.float64) if has_bias else None,
            torch.randn(n, out, generator=g, dtype=torch.float64)]
    want = reference.linear_mse_fwd_bwd(*args, 1, True)
    got = torch.ops.fusedtrain.linear_mse_fwd_bwd(*[a.to(dtype).cuda() if a is not None else None for a in args], 1, True)
    for w, o in zip(want, got):
        if w.numel():
            assert float((o.cpu().double() - w).norm() / w.norm()) <= (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 0.01}), ("SGD", {"lr": 0.05, "momentum": 0.9})])
def test_fused_train_step_and_fit_on_cuda_equal_the_stock_loop(name, kwargs):
    import copy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=g).cuda()
    y = (x @ torch.randn(32, 1, generator=g).cuda()) + 0.1
    torch.manual_seed(0)
    stock = torch.nn.Linear(32, 1).cuda()
    fused, fitted = copy.deepcopy(stock), copy.deepcopy(stock)
    stock_opt = getattr(torch.optim, name)(stock.parameters(), **kwargs)
    step = fusedtrain.FusedTrainStep(fused, getattr(fusedtrain.optim, name)(fused.parameters(), **kwargs))
    for _ in range(50):
        stock_opt.zero_grad()
        torch.nn.functional.mse_loss(stock(x), y).backward()
        stock_opt.step()
        step(x, y)
    fusedtrain.fit(fitted, getattr(fusedtrain.optim, name)(fitted.parameters(), **kwargs), x, y, epochs=50)
    for model in (fused, fitted):
        for a, b in zip(stock.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ---- The layer-stack ops on CUDA (csrc/cuda/stack_cuda.cu) ------------------------------------
# Each path against the reference ops on the CPU, same inputs: depth 1 under MSE runs the linear +
# MSE kernels (one cooperative launch for out <= 16, GEMMs above), narrow stacks the one-launch
# narrow kernel, everything else the GEMM path; all of them end in the same optimizer update.

ACTIVATION_MODULES = {
    "identity": torch.nn.Identity, "relu": torch.nn.ReLU, "leaky_relu": lambda: torch.nn.LeakyReLU(0.2),
    "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU,
    "gelu_tanh": lambda: torch.nn.GELU("tanh"), "silu": torch.nn.SiLU,
}
CRITERIA = {
    "mse": torch.nn.MSELoss, "mse_sum": lambda: torch.nn.MSELoss(reduction="sum"), "l1": torch.nn.L1Loss,
    "smooth_l1": lambda: torch.nn.SmoothL1Loss(beta=0.3),
    "huber": lambda: torch.nn.HuberLoss(delta=0.4),
    "huber_sum": lambda: torch.nn.HuberLoss(reduction="sum", delta=0.4),
    "cross_entropy": lambda: torch.nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
    "cross_entropy_sum": lambda: torch.nn.CrossEntropyLoss(reduction="sum"),
    "bce_with_logits": torch.nn.BCEWithLogitsLoss,
}
# name -> (the op's optimizer, its hyperparameters after the state lists)
STACK_OPTIMIZERS = {
    "sgd": ("sgd", dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                        first_step=False)),
    "sgd-decay-maximize": ("sgd", dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.05, nesterov=False,
                                       maximize=True, first_step=False)),
    "sgd-momentum-first": ("sgd", dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.0, nesterov=False,
                                       maximize=False, first_step=True)),
    "sgd-nesterov-decay-first": ("sgd", dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.05,
                                             nesterov=True, maximize=False, first_step=True)),
    "sgd-nesterov-resumed-maximize": ("sgd", dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.0,
                                                  nesterov=True, maximize=True, first_step=False)),
    "adam": ("adam", dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=False,
                          amsgrad=False, maximize=False)),
    "adam-amsgrad": ("adam", dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=False,
                                  amsgrad=True, maximize=False)),
    "adamw": ("adam", dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True,
                           amsgrad=False, maximize=False)),
    "adamw-amsgrad-maximize": ("adam", dict(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1,
                                            decoupled=True, amsgrad=True, maximize=True)),
}
# name -> (widths, activation after every layer but the last, criterion): one of each kernel path.
STACK_PATHS = {
    "linear-out1": ([33, 1], "identity", "mse"),          # one cooperative launch, rows split
    "linear-out16": ([3000, 16], "identity", "mse"),  # one cooperative launch, columns split too
    "linear-out40": ([33, 40], "identity", "mse"),        # the linear GEMMs, then the optimizer kernels
    "narrow-tutorial": ([10, 64, 32, 1], "relu", "mse"),  # the tutorial MLP: the one-launch narrow kernel
    "narrow-classes": ([20, 64, 5], "gelu", "cross_entropy"),
    "wide-huber": ([50, 300, 130, 3], "silu", "huber"),  # GEMMs and fused elementwise kernels
    "wide-bce": ([200, 257, 4], "tanh", "bce_with_logits"),
}


def stack_problem(widths, activation, criterion, n, dtype, seed, bias=True, top_activation=False):
    """x, target, params (on the CPU) and spec of Linear(widths[0], widths[1]), activation, ...,
    Linear(widths[-2], widths[-1]) (then the activation once more with top_activation) under
    `criterion`, described by fusedtrain.stacks as FusedTrainStep does."""
    from fusedtrain import stacks

    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2 or top_activation:
            layers.append(ACTIVATION_MODULES[activation]())
    stack = stacks.describe(torch.nn.Sequential(*layers).to(dtype), CRITERIA[criterion]())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=dtype)
    if criterion.startswith("cross_entropy"):
        y = torch.randint(0, widths[-1], (n,), generator=g)
    elif criterion == "bce_with_logits":
        y = torch.rand(n, widths[-1], generator=g, dtype=dtype)
    else:
        y = torch.randn(n, widths[-1], generator=g, dtype=dtype)
    return x, stacks.prepare_target(stack, x, y, "test"), [p.detach().clone() for p in stack.params()], stack.spec


def stack_state(optimizer, params, seed):
    """The optimizer's state lists for params, with random contents (a first SGD step must
    overwrite its momentum buffers whatever they hold); Adam's step counts float32, as on CUDA."""
    kind, hyper = STACK_OPTIMIZERS[optimizer]
    g = torch.Generator().manual_seed(seed)

    def like_params(scale):
        return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in params]

    if kind == "adam":
        exp_avg_sqs = [t.abs() for t in like_params(0.1)]
        return [like_params(0.1), exp_avg_sqs, [t * 1.5 for t in exp_avg_sqs] if hyper["amsgrad"] else [],
                [torch.tensor(3.0) for _ in params]]
    return [like_params(1.0) if hyper["momentum"] else []]


def stack_step(ops, optimizer, x, target, params, spec, state, **overrides):
    """One train step by `ops` (torch.ops.fusedtrain or fusedtrain.reference); returns the loss."""
    kind, hyper = STACK_OPTIMIZERS[optimizer]
    return getattr(ops, f"stack_{kind}_step_")(x, target, params, *spec, *state, **{**hyper, **overrides})


def to_device(tensors, device="cuda"):
    """A (nested) list of tensors on `device`, copied."""
    if isinstance(tensors, torch.Tensor):
        return tensors.to(device, copy=True)
    return [to_device(t, device) for t in tensors]


def flat(lists):
    return [t for lst in lists for t in (lst if isinstance(lst, list) else [lst])]


def stack_tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


def fwd_bwd_cases():
    """Every activation and every loss (classification heads included), each at least once, on the
    GEMM path: widths from 1 to 300, a layer without bias, an activation after the top layer."""
    losses = list(CRITERIA)
    for i, activation in enumerate(ACTIVATION_MODULES):
        for j, criterion in enumerate([losses[i % len(losses)], losses[(i + 3) % len(losses)]]):
            dtype = [torch.float32, torch.float64][(i + j) % 2]
            widths = [[7, 300, 1, 5], [64, 17, 130], [3, 1, 200, 9, 6]][(i + j) % 3]
            yield pytest.param(activation, criterion, widths, dtype, (i + j) % 4 == 1, j == 1 and i % 2 == 0,
                               id=f"{activation}-{criterion}-{str(dtype)[6:]}")


@pytest.mark.parametrize("activation,criterion,widths,dtype,no_bias,top_activation", list(fwd_bwd_cases()))
def test_stack_fwd_bwd_on_cuda_matches_reference(activation, criterion, widths, dtype, no_bias, top_activation):
    x, target, params, spec = stack_problem(widths, activation, criterion, 300, dtype, seed=len(widths),
                                            bias=not no_bias, top_activation=top_activation)
    if criterion == "cross_entropy":
        target[::7] = 2  # ignore_index: rows that count for nothing
    want_loss, want_grads = reference.stack_fwd_bwd(x, target, params, *spec)
    got_loss, got_grads = torch.ops.fusedtrain.stack_fwd_bwd(*to_device([x, target, params]), *spec)
    tol = stack_tolerance(dtype)
    assert got_loss.dtype == dtype and got_loss.shape == () and got_loss.is_cuda
    torch.testing.assert_close(got_loss.cpu(), want_loss, **tol)
    assert len(got_grads) == len(want_grads)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got.cpu(), want, **tol)
    loss_only, no_grads = torch.ops.fusedtrain.stack_fwd_bwd(*to_device([x, target, params]), *spec, need_grads=False)
    assert no_grads == []
    torch.testing.assert_close(loss_only.cpu(), want_loss, **tol)


@pytest.mark.parametrize("path", ["linear-out1", "linear-out40", "wide-huber"])
def test_stack_fwd_bwd_on_cuda_of_an_empty_batch_and_a_shared_layer(path):
    """An empty batch: a NaN mean and zero gradients, as torch. An nn.Linear applied twice: its
    gradient adds up both uses."""
    from fusedtrain import stacks

    widths, activation, criterion = STACK_PATHS[path]
    x, target, params, spec = stack_problem(widths, activation, criterion, 0, torch.float64, seed=1)
    want_loss, want_grads = reference.stack_fwd_bwd(x, target, params, *spec)
    got_loss, got_grads = torch.ops.fusedtrain.stack_fwd_bwd(*to_device([x, target, params]), *spec)
    torch.testing.assert_close(got_loss.cpu(), want_loss, equal_nan=True)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got.cpu(), want)
    # Linear(w, w) -> tanh -> the same Linear -> Linear(w, 2), under L1; and the same weight used
    # with its bias first and without it the second time (the op allows it: the bias gradient
    # then comes from the first use alone).
    w = widths[0]
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 for shape in [(w, w), (w,), (2, w), (2,)]]
    x = torch.randn(70, w, generator=g, dtype=torch.float64)
    target = torch.randn(70, 2, generator=g, dtype=torch.float64)
    for second_bias in (True, False):
        spec = stacks.StackSpec([True, second_bias, True], [0, 0, 2], [reference.Activation.TANH, 0, 0], [0.0] * 3,
                                reference.Loss.L1, reference.MEAN, 0.0, -100, 0.0)
        want_loss, want_grads = reference.stack_fwd_bwd(x, target, params, *spec)
        got_loss, got_grads = torch.ops.fusedtrain.stack_fwd_bwd(*to_device([x, target, params]), *spec)
        torch.testing.assert_close(got_loss.cpu(), want_loss)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got.cpu(), want)


def train_step_cases():
    """Every optimizer setting on three kernel paths, every path under several optimizers, fp32 and
    fp64 alternating."""
    paths = list(STACK_PATHS)
    for i, optimizer in enumerate(STACK_OPTIMIZERS):
        for j in range(3):
            path = paths[(3 * i + j) % len(paths)]
            dtype = [torch.float32, torch.float64][(i + j) % 2]
            yield pytest.param(optimizer, path, dtype, id=f"{optimizer}-{path}-{str(dtype)[6:]}")


@pytest.mark.parametrize("optimizer,path,dtype", list(train_step_cases()))
def test_stack_train_step_on_cuda_matches_reference(optimizer, path, dtype):
    """Consecutive steps on batches of other sizes and reductions (a grid that differs from one
    launch to the next: nothing may carry over) against the reference ops on the same state."""
    widths, activation, criterion = STACK_PATHS[path]
    x, target, params, spec = stack_problem(widths, activation, criterion, 3000, dtype, seed=len(optimizer))
    state = stack_state(optimizer, params, seed=5)
    gpu_params, gpu_state = to_device(params), to_device(state)
    first_step = STACK_OPTIMIZERS[optimizer][1].get("first_step", False)
    tol = stack_tolerance(dtype)
    batches = [(slice(0, 3000), spec.reduction), (slice(100, 137), reference.SUM), (slice(5, 6), reference.MEAN),
               (slice(0, 500), spec.reduction)]
    for step, (rows, reduction) in enumerate(batches):
        step_spec = spec._replace(reduction=reduction)
        overrides = {"first_step": first_step and step == 0} if "first_step" in STACK_OPTIMIZERS[optimizer][1] else {}
        want = stack_step(reference, optimizer, x[rows], target[rows], params, step_spec, state, **overrides)
        got = stack_step(torch.ops.fusedtrain, optimizer, x[rows].cuda(), target[rows].cuda(), gpu_params, step_spec,
                         gpu_state, **overrides)
        assert got.dtype == dtype and got.shape == () and got.is_cuda
        torch.testing.assert_close(got.cpu(), want, equal_nan=True, **tol)  # one ignored row: 0 / 0
        for expected, actual in zip(params + flat(state), gpu_params + flat(gpu_state)):
            torch.testing.assert_close(actual.cpu(), expected, **tol)


@pytest.mark.parametrize("path", ["linear-out1", "narrow-tutorial", "wide-bce"])
@pytest.mark.parametrize("optimizer", ["adamw-amsgrad-maximize", "sgd-nesterov-resumed-maximize"])
def test_stack_train_step_on_cuda_with_a_tensor_lr(optimizer, path):
    """lr_tensor replaces lr (the one-launch kernels take a float lr: a tensor one takes the paths
    that end in the optimizer kernels, which read it on the device)."""
    widths, activation, criterion = STACK_PATHS[path]
    x, target, params, spec = stack_problem(widths, activation, criterion, 200, torch.float32, seed=9)
    state = stack_state(optimizer, params, seed=9)
    gpu = to_device([x, target, params, state])
    lr_tensor = torch.tensor(0.0123)
    want = stack_step(reference, optimizer, x, target, params, spec, state, lr=lr_tensor.item())
    got = stack_step(torch.ops.fusedtrain, optimizer, *gpu[:3], spec, gpu[3], lr=123.0, lr_tensor=lr_tensor.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    for expected, actual in zip(params + flat(state), gpu[2] + flat(gpu[3])):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum-first"])
def test_small_out_linear_train_step_is_one_kernel_launch(optimizer):
    widths, activation, criterion = [64, 8], "identity", "mse"
    x, target, params, spec = stack_problem(widths, activation, criterion, 5000, torch.float32, seed=3)
    x, target, params, state = to_device([x, target, params, stack_state(optimizer, params, seed=3)])
    stack_step(torch.ops.fusedtrain, optimizer, x, target, params, spec, state)  # a first call sizes the grid
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        stack_step(torch.ops.fusedtrain, optimizer, x, target, params, spec, state)
        torch.cuda.synchronize()
    on_device = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(on_device) == 1 and "fused_linear_mse" in on_device[0], on_device


@pytest.mark.parametrize("path", list(STACK_PATHS))
def test_stack_train_step_on_cuda_never_synchronizes(path):
    widths, activation, criterion = STACK_PATHS[path]
    x, target, params, spec = stack_problem(widths, activation, criterion, 100, torch.float32, seed=4)
    for optimizer in ("adam-amsgrad", "sgd-nesterov-resumed-maximize"):
        gpu = to_device([x, target, params, stack_state(optimizer, params, seed=4)])
        stack_step(torch.ops.fusedtrain, optimizer, *gpu[:3], spec, gpu[3])  # warm-up: cuBLAS, the grid size
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stack_step(torch.ops.fusedtrain, optimizer, *gpu[:3], spec, gpu[3])
            torch.ops.fusedtrain.stack_fwd_bwd(*gpu[:3], *spec)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_stack_train_step_on_cuda_rejects_bad_arguments_before_changing_anything():
    widths, activation, criterion = STACK_PATHS["narrow-tutorial"]
    x, target, params, spec = stack_problem(widths, activation, criterion, 64, torch.float32, seed=6)
    x, target, params, (exp_avgs, exp_avg_sqs, _, steps) = to_device([x, target, params,
                                                                      stack_state("adam", params, seed=6)])
    steps[0] = torch.tensor(0.0)
    _, hyper = STACK_OPTIMIZERS["adam"]
    buffers = [torch.zeros_like(p) for p in params]
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps[1:] + buffers]
    op = torch.ops.fusedtrain.stack_adam_step_
    with pytest.raises(ValueError, match=r"stack_adam_step_: steps\[0\] is on cpu"):
        op(x, target, params, *spec, exp_avgs, exp_avg_sqs, [], steps, **hyper)
    steps[0] = torch.tensor(0.0, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"steps\[0\] must be float32 on CUDA"):
        op(x, target, params, *spec, exp_avgs, exp_avg_sqs, [], steps, **hyper)
    steps[0] = torch.tensor(0.0, device="cuda")
    with pytest.raises(ValueError, match="exp_avgs has 5 tensors, expected 6"):
        op(x, target, params, *spec, exp_avgs[:5], exp_avg_sqs, [], steps, **hyper)
    with pytest.raises(ValueError, match="max_exp_avg_sqs has 0 tensors, expected 6"):
        op(x, target, params, *spec, exp_avgs, exp_avg_sqs, [], steps, **{**hyper, "amsgrad": True})
    with pytest.raises(ValueError, match=r"params\[0\] \(layer 0's weight\) is on cuda:0 but x is on cpu"):
        op(x.cpu(), target, params, *spec, exp_avgs, exp_avg_sqs, [], steps, **hyper)
    with pytest.raises(ValueError, match="lr_tensor is on cpu"):
        op(x, target, params, *spec, exp_avgs, exp_avg_sqs, [], steps, **hyper, lr_tensor=torch.tensor(0.1))
    sgd = torch.ops.fusedtrain.stack_sgd_step_
    _, sgd_hyper = STACK_OPTIMIZERS["sgd-momentum-first"]
    with pytest.raises(ValueError, match="stack_sgd_step_: momentum_buffers has 5 tensors, expected 6"):
        sgd(x, target, params, *spec, buffers[:5], **sgd_hyper)
    with pytest.raises(ValueError, match="optimizer state must be contiguous"):
        sgd(x, target, params, *spec, buffers[:2] + [torch.zeros(64, 32, device="cuda").t()] + buffers[3:],
            **sgd_hyper)
    torch.cuda.synchronize()
    for b, a in zip(before, params + exp_avgs + exp_avg_sqs + steps[1:] + buffers):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["linear", "tutorial"])
@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 0.01, "amsgrad": True}),
                                         ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True})])
def test_fused_train_step_of_a_stack_on_cuda_equals_the_stock_loop(model, name, kwargs):
    import copy

    from helpers import SimpleModel

    torch.manual_seed(0)
    stock = (torch.nn.Linear(10, 1) if model == "linear" else SimpleModel()).cuda()
    fused = copy.deepcopy(stock)
    stock_opt = getattr(torch.optim, name)(stock.parameters(), **kwargs)
    # backend="native": the CUDA stack kernels, not the reference that "auto" falls back to.
    step = fusedtrain.FusedTrainStep(fused, getattr(fusedtrain.optim, name)(fused.parameters(), **kwargs),
                                     backend="native")
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(32, 10, generator=g).cuda(), torch.randn(32, 1, generator=g).cuda()
        stock_opt.zero_grad()
        want = torch.nn.functional.mse_loss(stock(x), y)
        want.backward()
        stock_opt.step()
        torch.testing.assert_close(step(x, y), want.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# The launcher's sizes (csrc/cuda/multi_tensor_apply.cuh): elements per chunk, chunks per launch.
CHUNK = 65536
TABLE_CHUNKS = 320


def cuda_copy(t, offset=0):
    """`t` on the GPU, `offset` elements into its storage: contiguous, but for offset != 0 not
    16-byte aligned, which sends its chunks down the kernels' element-wise path."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
    out = base[offset:].view(t.shape)
    out.copy_(t)
    return out


def assert_lists_close(got_lists, want_lists):
    """Compared on the GPU, which is quick for the large tensors."""
    for got, want in zip(got_lists, want_lists, strict=True):
        for g, w in zip(got, want, strict=True):
            tol = {} if w.dtype in (torch.float32, torch.float64) else {"atol": 1e-2, "rtol": 1e-2}
            torch.testing.assert_close(g, w.to(g.device), **tol)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", ["adam_step_", "sgd_step_"])
def test_lr_tensor_replaces_the_float_lr(op, lr_dtype):
    lr_tensor = torch.tensor(0.0123, dtype=lr_dtype)
    lr = lr_tensor.item()  # the value the kernel reads
    if op == "adam_step_":
        params, grads, exp_avgs = random_lists(torch.float32, 3, 3)
        exp_avg_sqs = [t.abs() for t in random_lists(torch.float32, 1, 4)[0]]
        cpu = [params, grads, exp_avgs, exp_avg_sqs, [], [torch.tensor(2.0) for _ in SHAPES]]
        # Decoupled decay: lr enters the param decay as well as the step size.
        hyper = dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True,
                     amsgrad=False, maximize=False)
    else:
        cpu = random_lists(torch.float32, 3, 5)
        hyper = dict(momentum=0.9, dampening=0.1, weight_decay=0.05, nesterov=True,
                     maximize=False, first_step=False)
    gpu = to_cuda(cpu)
    getattr(reference, op)(*cpu, lr=lr, **hyper)
    getattr(torch.ops.fusedtrain, op)(*gpu, lr=123.0, **hyper, lr_tensor=lr_tensor.cuda())
    assert_lists_close(gpu, cpu)


@pytest.mark.parametrize("bad_lr,problem", [(torch.tensor(0.01), "on cpu"),
                                            (torch.tensor([0.01, 0.02]), "two elements"),
                                            (torch.tensor(1), "int64")])
def test_bad_lr_tensor_is_refused_before_anything_changes(bad_lr, problem):
    lr_tensor = bad_lr if problem == "on cpu" else bad_lr.cuda()
    params, grads = to_cuda(random_lists(torch.float32, 2, 6))
    before = [p.clone() for p in params]
    with pytest.raises((RuntimeError, ValueError, TypeError), match="lr_tensor"):
        torch.ops.fusedtrain.sgd_step_(params, grads, [], 0.01, 0.0, 0.0, 0.0, False, False, False,
                                       lr_tensor=lr_tensor)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def many_tensor_lists(streams, seed, count=300):
    """`streams` lists of `count` + 2 tensors: every size class around a chunk, in float32,
    bfloat16, float64 and float16 (one launch sequence each, several launches each: more
    tensors than a table holds), and a float32 and a float16 tensor with more chunks than a
    launch holds."""
    shapes = [(), (0,), (7,), (129,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (3 * CHUNK + 5,), (33, 65)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    specs = [(shapes[i % len(shapes)], dtypes[(i // len(shapes)) % len(dtypes)]) for i in range(count)]
    specs.insert(count // 2, ((TABLE_CHUNKS * CHUNK + 1000,), torch.float32))
    specs.insert(count // 3, ((TABLE_CHUNKS * CHUNK + 77,), torch.float16))
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=g).to(dtype) for shape, dtype in specs] for _ in range(streams)]


def to_cuda_some_unaligned(lists):
    """On the GPU; some tensors of every list (params, grads and optimizer state) at an address
    that is not 16-byte aligned, the others aligned."""
    return [[cuda_copy(t, offset=1 if (i + 3 * k) % 5 == 0 else 0) for i, t in enumerate(lst)]
            for k, lst in enumerate(lists)]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_over_many_tensors_and_launches_matches_reference(amsgrad):
    params, grads, exp_avgs, exp_avg_sqs, max_sqs = many_tensor_lists(5, 7)
    exp_avg_sqs = [t.abs() for t in exp_avg_sqs]
    max_sqs = [t.abs() for t in max_sqs] if amsgrad else []
    # A different step per tensor: each block must read its own tensor's counter.
    steps = [torch.tensor(float(i % 7)) for i in range(len(params))]
    cpu = [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps]
    gpu = to_cuda_some_unaligned(cpu)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=False,
                 amsgrad=amsgrad, maximize=False)
    reference.adam_step_(*cpu, **hyper)
    torch.ops.fusedtrain.adam_step_(*gpu, **hyper)
    assert_lists_close(gpu, cpu)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_over_many_tensors_and_launches_matches_reference(momentum):
    lists = many_tensor_lists(3 if momentum else 2, 8)
    cpu = lists if momentum else [*lists, []]
    gpu = to_cuda_some_unaligned(cpu)
    hyper = dict(lr=0.01, momentum=momentum, dampening=0.0, weight_decay=0.05, nesterov=False,
                 maximize=False, first_step=False)
    reference.sgd_step_(*cpu, **hyper)
    torch.ops.fusedtrain.sgd_step_(*gpu, **hyper)
    assert_lists_close(gpu, cpu)


@pytest.mark.parametrize("op", ["adam_step_", "sgd_step_"])
def test_found_inf_skips_the_update_and_the_step_increment(op):
    if op == "adam_step_":
        params, grads, exp_avgs, exp_avg_sqs = random_lists(torch.float32, 4, 9)
        lists = [params, grads, exp_avgs, [t.abs() for t in exp_avg_sqs], [],
                 [torch.tensor(4.0) for _ in SHAPES]]
        hyper = [0.01, 0.9, 0.99, 1e-8, 0.0, False, False, False]
    else:
        lists = random_lists(torch.float32, 3, 10)
        hyper = [0.01, 0.9, 0.0, 0.0, False, False, False]
    gpu = to_cuda(lists)
    before = [[t.clone() for t in lst] for lst in gpu]
    getattr(torch.ops.fusedtrain, op)(*gpu, *hyper, grad_scale=torch.tensor(8.0, device="cuda"),
                                      found_inf=torch.tensor(1.0, device="cuda"),
                                      lr_tensor=torch.tensor(0.5, device="cuda"))
    for got, want in zip(gpu, before):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("name,kwargs", [("Adam", {}), ("AdamW", {"weight_decay": 0.1, "amsgrad": True})])
def test_captured_adam_step_replays_like_eager_torch_adam(name, kwargs):
    shapes = [(64, 33), (33,), (), (0, 4), (70001,)]
    warmup_steps, replays = 3, 5
    g = torch.Generator().manual_seed(12)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).cuda()) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = [[torch.randn(s, generator=g).cuda() for s in shapes] for _ in range(warmup_steps + replays)]
    lrs = [1e-3] * warmup_steps + [2e-3, 5e-4, 1e-2, 3e-3, 7e-4]
    lr = torch.tensor(lrs[0], device="cuda")
    opt = getattr(fusedtrain.optim, name)(ours, lr=lr, capturable=True, **kwargs)
    eager = getattr(torch.optim, name)(theirs, lr=lrs[0], capturable=False, foreach=False, **kwargs)
    for p in ours:
        p.grad = torch.zeros_like(p)  # the static gradients that the captured step reads

    def eager_step(k):
        for p, grad in zip(theirs, grads[k]):
            p.grad = grad.clone()
        eager.param_groups[0]["lr"] = lr.item()  # the float32 value that ours reads
        eager.step()

    # Warm up on a side stream (creates the state), as torch.cuda.graphs' docs show.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(warmup_steps):
            for p, grad in zip(ours, grads[k]):
                p.grad.copy_(grad)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for k in range(warmup_steps):
        eager_step(k)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(warmup_steps, warmup_steps + replays):
        lr.fill_(lrs[k])
        for p, grad in zip(ours, grads[k]):
            p.grad.copy_(grad)
        graph.replay()
        eager_step(k)

    torch.cuda.synchronize()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)
        for key, value in eager.state[q].items():
            if key == "step":
                assert float(opt.state[p][key]) == float(value) == warmup_steps + replays
            else:
                torch.testing.assert_close(opt.state[p][key], value)


# ---- The optimizer kernels: what they store, big tensors, graphs, GradScaler -------------------

# A bf16 NaN whose payload a round trip through fp32 would not keep (fp32 -> bf16 makes every
# NaN 0x7fc0): a store of a grad that the kernel only reads would change its bits.
BF16_NAN_WITH_PAYLOAD = 0x7FA1


@pytest.mark.parametrize("op,momentum", [("adam_step_", None), ("sgd_step_", 0.0), ("sgd_step_", 0.9)])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_optimizer_kernels_store_no_grad_without_grad_scale(op, momentum, offset):
    g = torch.Generator().manual_seed(13)
    shapes = [(CHUNK + 37,), (5, 9)]
    params = [cuda_copy(torch.randn(s, generator=g).bfloat16(), offset) for s in shapes]
    grads = [cuda_copy(torch.randn(s, generator=g).bfloat16(), offset) for s in shapes]
    for grad in grads:
        grad.view(-1).view(torch.int16)[3] = BF16_NAN_WITH_PAYLOAD
    bits = [grad.view(torch.int16).clone() for grad in grads]
    if op == "adam_step_":
        state = [[cuda_copy(torch.zeros(s).bfloat16(), offset) for s in shapes] for _ in range(2)]
        torch.ops.fusedtrain.adam_step_(params, grads, *state, [], [torch.zeros((), device="cuda") for _ in shapes],
                                        0.01, 0.9, 0.99, 1e-8, 0.0, False, False, False)
    else:
        buffers = [cuda_copy(torch.randn(s, generator=g).bfloat16(), offset) for s in shapes] if momentum else []
        torch.ops.fusedtrain.sgd_step_(params, grads, buffers, 0.01, momentum, 0.0, 0.0, False, False, False)
    for grad, before in zip(grads, bits):
        assert torch.equal(grad.view(torch.int16), before)
    # With a grad_scale the kernels do store the grad, unscaled, as torch's fused optimizers do.
    scale = torch.tensor(4.0, device="cuda")
    for grad in grads:
        grad.fill_(2.0)
    if op == "adam_step_":
        torch.ops.fusedtrain.adam_step_(params, grads, *state, [], [torch.zeros((), device="cuda") for _ in shapes],
                                        0.01, 0.9, 0.99, 1e-8, 0.0, False, False, False, grad_scale=scale)
    else:
        torch.ops.fusedtrain.sgd_step_(params, grads, buffers, 0.01, momentum, 0.0, 0.0, False, False, False,
                                       grad_scale=scale)
    for grad in grads:
        assert torch.equal(grad, torch.full_like(grad, 0.5))


def test_bfloat16_sgd_step_over_more_than_2_31_elements():
    """One tensor of 2^31 + 1000 bf16 elements (64-bit indexing in the kernels, int32 chunk
    numbers in the tables): slices at the start, around element 2^31 and at the end against the
    reference math on those slices, computed before the step; the rest is not copied off the
    GPU."""
    numel = 2**31 + 1000
    gen = torch.Generator(device="cuda").manual_seed(21)
    param = torch.randn(numel, generator=gen, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(numel, generator=gen, device="cuda", dtype=torch.bfloat16)
    slices = [slice(0, 4096), slice(2**31 - 3000, 2**31 + 3000), slice(numel - 5000, numel)]
    want = [param[s].clone() for s in slices]
    hyper = dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False,
                 first_step=False)
    reference.sgd_step_(want, [grad[s].clone() for s in slices], [], **hyper)
    torch.ops.fusedtrain.sgd_step_([param], [grad], [], **hyper)
    for s, w in zip(slices, want):
        torch.testing.assert_close(param[s], w, atol=1e-2, rtol=1e-2)
    del param, grad
    torch.cuda.empty_cache()


def test_captured_sgd_step_replays_like_eager_torch_sgd():
    """fusedtrain.optim.SGD with momentum captured after a warm-up (which creates the momentum
    buffers), replayed with new gradients and a new tensor lr each time, against torch.optim.SGD
    stepping eagerly."""
    shapes = [(64, 33), (33,), (), (70001,)]
    warmup_steps, replays = 2, 4
    g = torch.Generator().manual_seed(14)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).cuda()) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = [[torch.randn(s, generator=g).cuda() for s in shapes] for _ in range(warmup_steps + replays)]
    lrs = [0.01] * warmup_steps + [0.02, 0.005, 0.03, 0.001]
    lr = torch.tensor(lrs[0], device="cuda")
    kwargs = dict(momentum=0.9, weight_decay=0.01, nesterov=True)
    opt = fusedtrain.optim.SGD(ours, lr=lr, **kwargs)
    eager = torch.optim.SGD(theirs, lr=lrs[0], foreach=False, **kwargs)
    for p in ours:
        p.grad = torch.zeros_like(p)

    def eager_step(k):
        for p, grad in zip(theirs, grads[k]):
            p.grad = grad.clone()
        eager.param_groups[0]["lr"] = lr.item()  # the float32 value that ours reads
        eager.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(warmup_steps):
            for p, grad in zip(ours, grads[k]):
                p.grad.copy_(grad)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for k in range(warmup_steps):
        eager_step(k)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(warmup_steps, warmup_steps + replays):
        lr.fill_(lrs[k])
        for p, grad in zip(ours, grads[k]):
            p.grad.copy_(grad)
        graph.replay()
        eager_step(k)
    torch.cuda.synchronize()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"])


@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 1e-3}), ("SGD", {"lr": 0.01, "momentum": 0.9})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grad_scaler_with_fused_optimizers_matches_torch_fused(name, kwargs, dtype):
    """torch.amp.GradScaler hands grad_scale and found_inf to fusedtrain.optim as to torch's
    fused optimizers: the same params, state and scale after a run whose third step has an inf
    gradient, a step that both skip (params and step counts as before it). float32 params under
    fp16 autocast; float16 params as they are."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).cuda().to(dtype)
    twin = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).cuda().to(dtype)
    twin.load_state_dict(model.state_dict())
    ours = getattr(fusedtrain.optim, name)(model.parameters(), **kwargs)
    theirs = getattr(torch.optim, name)(twin.parameters(), fused=True, **kwargs)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    x = torch.randn(64, 32, device="cuda", dtype=dtype)
    y = torch.randn(64, 1, device="cuda", dtype=dtype)
    inf_step = 2
    for step in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        for m, opt, scaler in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float32):
                loss = torch.nn.functional.mse_loss(m(x).float(), y.float())
            scaler.scale(loss).backward()
            if step == inf_step:
                next(m.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        if step == inf_step:
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p, b), "the step with an inf gradient was not skipped"
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **tol)
        for key, value in theirs.state[q].items():
            if key == "step":
                assert float(ours.state[p][key]) == float(value) == 7  # 8 steps, one skipped
            else:
                torch.testing.assert_close(ours.state[p][key], value, **tol)


# ---- The stack train step under CUDA graphs, its memory at large `in` -------------------------

@pytest.mark.parametrize("path", ["linear-out1", "linear-out40", "narrow-tutorial", "wide-huber"])
@pytest.mark.parametrize("optimizer", ["adamw-amsgrad-maximize", "sgd-nesterov-resumed-maximize"])
def test_captured_stack_train_step_replays_like_eager_steps(optimizer, path):
    """A train step captured once (after a warm-up), replayed on new batches copied into the static
    inputs and a new tensor lr, against the same op run eagerly on twins of the params and state.
    The one-launch linear kernel sums in a fixed order: bit for bit there."""
    widths, activation, criterion = STACK_PATHS[path]
    x, target, params, spec = stack_problem(widths, activation, criterion, 300, torch.float32, seed=11)
    state = stack_state(optimizer, params, seed=11)
    x, target, params, state = to_device([x, target, params, state])
    twin_params, twin_state = to_device([params, state])
    batches = [to_device(stack_problem(widths, activation, criterion, 300, torch.float32, seed=20 + k)[:2])
               for k in range(4)]
    lrs = [0.02, 0.005, 0.03, 0.001]
    op = torch.ops.fusedtrain
    static_x, static_target = x.clone(), target.clone()
    tol = dict(rtol=0, atol=0) if path == "linear-out1" else dict(rtol=1e-5, atol=1e-6)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS handles, the grid's occupancy query)
        stack_step(op, optimizer, static_x, static_target, params, spec, state)
    torch.cuda.current_stream().wait_stream(side)
    stack_step(op, optimizer, static_x, static_target, twin_params, spec, twin_state)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = stack_step(op, optimizer, static_x, static_target, params, spec, state)
    for (bx, by), lr in zip(batches, lrs):
        static_x.copy_(bx)
        static_target.copy_(by)
        graph.replay()
        want = stack_step(op, optimizer, bx, by, twin_params, spec, twin_state)
        torch.testing.assert_close(static_loss, want, **tol)
    torch.cuda.synchronize()
    for got, want in zip(params + flat(state), twin_params + flat(twin_state)):
        torch.testing.assert_close(got, want, **tol)

    # A tensor lr: the captured step follows what is written into it between replays.
    lr = torch.tensor(lrs[0], device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up of the path a tensor lr takes
        stack_step(op, optimizer, static_x, static_target, params, spec, state, lr_tensor=lr)
    torch.cuda.current_stream().wait_stream(side)
    stack_step(op, optimizer, static_x, static_target, twin_params, spec, twin_state, lr=lr.item())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = stack_step(op, optimizer, static_x, static_target, params, spec, state, lr_tensor=lr)
    for (bx, by), value in zip(batches, lrs):
        static_x.copy_(bx)
        static_target.copy_(by)
        lr.fill_(value)
        graph.replay()
        want = stack_step(op, optimizer, bx, by, twin_params, spec, twin_state, lr=lr.item())
        torch.testing.assert_close(static_loss, want, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    for got, want in zip(params + flat(state), twin_params + flat(twin_state)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.concurrent_grids
def test_two_captured_train_steps_replay_back_to_back_and_at_once():
    """Two one-launch linear train steps (two models) captured on the same stream, then replayed one
    after the other and at the same time on two streams: each equals the same steps run eagerly.
    Nothing is shared between launches (no counter per stream), so concurrent replays cannot
    interfere."""
    optimizer = "adam-amsgrad"
    problems = []
    for k in range(2):
        x, target, params, spec = stack_problem([300, 3], "identity", "mse", 2000, torch.float32, seed=40 + k)
        problems.append(to_device([x, target, params, stack_state(optimizer, params, seed=k)]))
    twins = [to_device([params, state]) for _, _, params, state in problems]
    op = torch.ops.fusedtrain
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    graphs, losses = [], []
    for x, target, params, state in problems:
        with torch.cuda.stream(capture_stream):
            stack_step(op, optimizer, x, target, params, spec, state)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            losses.append(stack_step(op, optimizer, x, target, params, spec, state))
        graphs.append(graph)
    torch.cuda.current_stream().wait_stream(capture_stream)

    def eager_steps(count):
        wants = []
        for (x, target, _, _), (params, state) in zip(problems, twins):
            for _ in range(count):
                wants.append(stack_step(op, optimizer, x, target, params, spec, state))
        return wants

    eager_steps(1)  # the warm-up steps
    for _ in range(3):  # back to back
        for graph in graphs:
            graph.replay()
    wants = eager_steps(3)
    torch.testing.assert_close(losses, [wants[2], wants[5]], rtol=0, atol=0)
    streams = [torch.cuda.Stream() for _ in graphs]
    for _ in range(4):  # at once
        for stream, graph in zip(streams, graphs):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
    wants = eager_steps(4)
    torch.cuda.synchronize()
    torch.testing.assert_close(losses, [wants[3], wants[7]], rtol=0, atol=0)
    for (_, _, params, state), (twin_params, twin_state) in zip(problems, twins):
        for got, want in zip(params + flat(state), twin_params + flat(twin_state)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_narrow_linear_train_step_at_large_in_stays_bounded_in_memory():
    """in = 2e6, out = 16, 256 rows: the fused kernel splits the columns over its blocks, so its
    scratch is one weight-sized partial gradient and small partial predictions (a partial
    gradient per block would take a weight per block, 128 MB each). One SGD step against the
    reference in fp64 on the GPU."""
    from fusedtrain import stacks

    n, inp, out = 256, 2_000_000, 16
    gen = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(n, inp, generator=gen, device="cuda")
    target = torch.randn(n, out, generator=gen, device="cuda")
    weight = torch.randn(out, inp, generator=gen, device="cuda") * 1e-3
    bias = torch.randn(out, generator=gen, device="cuda")
    spec = stacks.StackSpec([True], [0], [reference.Activation.IDENTITY], [0.0], reference.Loss.MSE, reference.MEAN,
                            0.0, -100, 0.0)
    optimizer = "sgd-momentum-first"
    buffers = [torch.empty_like(weight), torch.empty_like(bias)]
    want_params = [weight.double(), bias.double()]
    want_buffers = [torch.empty_like(p) for p in want_params]
    want_loss = stack_step(reference, optimizer, x.double(), target.double(), want_params, spec, [want_buffers])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = stack_step(torch.ops.fusedtrain, optimizer, x, target, [weight, bias], spec, [buffers])
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - before
    weight_bytes = weight.numel() * weight.element_size()
    assert growth <= weight_bytes + 64 * 2**20, f"{growth / 2**20:.0f} MB of scratch for a {weight_bytes / 2**20:.0f} MB weight"
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    for got, want in zip([weight, bias] + buffers, want_params + want_buffers):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# ---- A second GPU ----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_and_optimizers_on_the_second_gpu_while_the_first_is_current():
    """Tensors on cuda:1 while cuda:0 is the current device: the CUDA ops, the Triton ops and
    fusedtrain.optim run on cuda:1 and give what the same calls give on cuda:0."""
    import fusedtrain.triton

    torch.cuda.set_device(0)
    optimizer = "adam-amsgrad"
    x, target, params, spec = stack_problem([40, 3], "identity", "mse", 300, torch.float32, seed=50)
    state = stack_state(optimizer, params, seed=50)
    calls = {
        "cuda stack_adam_step_ (one launch)": lambda xs, ts, ps, ss: stack_step(
            torch.ops.fusedtrain, optimizer, xs, ts, ps, spec, ss),
        "cuda stack_adam_step_ (narrow)": lambda xs, ts, ps, ss: stack_step(
            torch.ops.fusedtrain, optimizer, xs, ts, ps, spec._replace(loss=reference.Loss.L1), ss),
        "cuda stack_adam_step_ (GEMMs, tensor lr)": lambda xs, ts, ps, ss: stack_step(
            torch.ops.fusedtrain, optimizer, xs, ts, ps, spec._replace(loss=reference.Loss.L1), ss,
            lr_tensor=torch.tensor(0.01, device=xs.device)),
        "cuda linear_mse_fwd_bwd": lambda xs, ts, ps, ss: torch.ops.fusedtrain.linear_mse_fwd_bwd(
            xs, *ps, ts, reference.MEAN, True),
        "triton stack_adam_step_": lambda xs, ts, ps, ss: stack_step(
            fusedtrain.triton, optimizer, xs, ts, ps, spec._replace(loss=reference.Loss.L1), ss),
        "triton linear_mse_fwd_bwd": lambda xs, ts, ps, ss: fusedtrain.triton.linear_mse_fwd_bwd(
            xs, *ps, ts, reference.MEAN, True),
    }
    for name, call in calls.items():
        on = {}
        for device in ("cuda:0", "cuda:1"):
            tensors = to_device([x, target, params, state], device)
            result = call(*tensors)
            on[device] = [t.cpu() for t in flat(list(result) if isinstance(result, tuple) else [result])
                          + tensors[2] + flat(tensors[3])]
        assert torch.cuda.current_device() == 0
        for a, b in zip(on["cuda:0"], on["cuda:1"]):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")

    for backend in ("native", "triton"):
        for name, kwargs in [("Adam", {"lr": 0.01, "amsgrad": True}), ("SGD", {"lr": 0.01, "momentum": 0.9})]:
            on = {}
            for device in ("cuda:0", "cuda:1"):
                torch.manual_seed(0)
                model = torch.nn.Linear(20, 3).to(device)
                opt = getattr(fusedtrain.optim, name)(model.parameters(), backend=backend, **kwargs)
                for _ in range(3):
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(model(x.to(device)[:, :20]), target.to(device)).backward()
                    opt.step()
                on[device] = [p.detach().cpu() for p in model.parameters()]
            assert torch.cuda.current_device() == 0
            for a, b in zip(on["cuda:0"], on["cuda:1"]):
                torch.testing.assert_close(a, b, msg=lambda m: f"{backend} {name}: {m}")

