"""The CUDA kernels on a GPU: the same agreement as on the CPU. Skipped without a GPU and a CUDA
build (CI has neither; bench/gpu_check.py runs these on a GPU machine)."""

import pytest
import torch

import fusedtrain
from fusedtrain import reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fusedtrain._extension.native_available()
         and fusedtrain._extension._C.has_cuda_kernels()),
    reason="needs a GPU and fusedtrain built with CUDA")

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,inp,out", [(1, 3, 1), (1000, 64, 16), (5000, 1024, 1), (700, 20, 128)])
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


# linear_mse_train_step_: one launch for out <= 16 (the last block applies the update), GEMMs and
# the optimizer kernels above; both against the reference's fwd_bwd followed by its optimizer step.
TRAIN_STEP_OPTIMIZERS = {
    "adam": dict(adam=True, weight_decay=0.1),
    "adam-amsgrad": dict(adam=True, amsgrad=True),
    "adamw": dict(adam=True, weight_decay=0.1, decoupled=True),
    "adamw-amsgrad-maximize": dict(adam=True, weight_decay=0.1, decoupled=True, amsgrad=True, maximize=True),
    "sgd": dict(weight_decay=0.05),
    "sgd-momentum-first": dict(momentum=0.9, dampening=0.1, first_step=True),
    "sgd-nesterov-first": dict(momentum=0.9, nesterov=True, weight_decay=0.05, first_step=True),
    "sgd-nesterov-resumed-maximize": dict(momentum=0.9, nesterov=True, maximize=True),
}


def train_step_hyper(**overrides):
    hyper = dict(adam=False, lr=0.01, weight_decay=0.0, maximize=False, beta1=0.9, beta2=0.99, eps=1e-8,
                 decoupled=False, amsgrad=False, momentum=0.0, dampening=0.0, nesterov=False, first_step=False)
    return {**hyper, **overrides}


def train_step_state(params, hyper, g):
    """The op's state list (order: csrc/cpu/linear_mse_fit.h) with random contents; a first SGD
    step must overwrite its momentum buffers whatever they hold."""
    def like_params(scale):
        return [torch.randn(p.shape, generator=g, dtype=p.dtype) * scale for p in params]

    if hyper["adam"]:
        exp_avg_sqs = [t.abs() for t in like_params(0.1)]
        max_sqs = [t * 1.5 for t in exp_avg_sqs] if hyper["amsgrad"] else []
        return like_params(0.1) + exp_avg_sqs + max_sqs + [torch.tensor(3.0) for _ in params]
    return like_params(1.0) if hyper["momentum"] != 0 else []


def reference_train_step(x, target, params, reduction, state, hyper):
    """What linear_mse_train_step_ does, composed from the reference ops; returns the loss."""
    bias = params[1] if len(params) > 1 else None
    loss, grad_weight, grad_bias, _ = reference.linear_mse_fwd_bwd(x, params[0], bias, target, reduction, False)
    grads = [grad_weight, grad_bias][:len(params)]
    h, n = hyper, len(params)
    if h["adam"]:
        groups = [state[i:i + n] for i in range(0, len(state), n)]
        reference.adam_step_(params, grads, groups[0], groups[1], groups[2] if h["amsgrad"] else [], groups[-1],
                             h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["decoupled"],
                             h["amsgrad"], h["maximize"])
    else:
        reference.sgd_step_(params, grads, state, h["lr"], h["momentum"], h["dampening"], h["weight_decay"],
                            h["nesterov"], h["maximize"], h["first_step"])
    return loss


def train_step_problem(dtype, n, inp, out, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g, dtype=dtype)
    target = torch.randn(n, out, generator=g, dtype=dtype)
    params = [torch.randn(out, inp, generator=g, dtype=dtype) * 0.2]
    if has_bias:
        params.append(torch.randn(out, generator=g, dtype=dtype))
    return x, target, params, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("out", [1, 4, 16, 40])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("optimizer", list(TRAIN_STEP_OPTIMIZERS))
def test_linear_mse_train_step_matches_reference(dtype, out, has_bias, optimizer):
    hyper = train_step_hyper(**TRAIN_STEP_OPTIMIZERS[optimizer])
    x, target, params, g = train_step_problem(dtype, 9000, 33, out, has_bias, seed=out * 2 + has_bias)
    state = train_step_state(params, hyper, g)
    gpu_params, gpu_state = [p.cuda() for p in params], [s.cuda() for s in state]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    # Consecutive steps on batches whose grids differ (256 blocks looping over rows, 2, 1, 16):
    # the stream's ticket counter must be back at zero after each launch.
    batches = [(slice(0, 9000), reference.MEAN), (slice(100, 137), reference.SUM),
               (slice(5, 6), reference.MEAN), (slice(0, 500), reference.MEAN)]
    for step, (rows, reduction) in enumerate(batches):
        step_hyper = {**hyper, "first_step": hyper["first_step"] and step == 0}
        want = reference_train_step(x[rows], target[rows], params, reduction, state, step_hyper)
        got = torch.ops.fusedtrain.linear_mse_train_step_(
            x[rows].cuda(), target[rows].cuda(), gpu_params[0], gpu_params[1] if has_bias else None,
            reduction, gpu_state, **step_hyper)
        assert got.dtype == dtype and got.shape == ()
        torch.testing.assert_close(got.cpu(), want, **tol)
        for expected, actual in zip(params + state, gpu_params + gpu_state):
            torch.testing.assert_close(actual.cpu(), expected, **tol)


def test_linear_mse_train_step_alternating_streams_matches_reference():
    hyper = train_step_hyper(adam=True, amsgrad=True)
    x, target, params, g = train_step_problem(torch.float32, 3000, 20, 3, True, seed=7)
    state = train_step_state(params, hyper, g)
    gpu_params, gpu_state = [p.cuda() for p in params], [s.cuda() for s in state]
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    for step, rows in enumerate([slice(0, 3000), slice(0, 40), slice(7, 2000), slice(1, 2)]):
        want = reference_train_step(x[rows], target[rows], params, reference.MEAN, state, hyper)
        stream = side if step % 2 else main
        stream.wait_stream(main if stream is side else side)
        with torch.cuda.stream(stream):
            got = torch.ops.fusedtrain.linear_mse_train_step_(
                x[rows].cuda(), target[rows].cuda(), *gpu_params, reference.MEAN, gpu_state, **hyper)
        torch.cuda.synchronize()
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
        for expected, actual in zip(params + state, gpu_params + gpu_state):
            torch.testing.assert_close(actual.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adam", [True, False])
def test_small_out_train_step_is_one_kernel_launch(adam):
    hyper = train_step_hyper(adam=adam, momentum=0.0 if adam else 0.9)
    x, target, params, g = train_step_problem(torch.float32, 5000, 64, 8, True, seed=3)
    state = [s.cuda() for s in train_step_state(params, hyper, g)]
    x, target, params = x.cuda(), target.cuda(), [p.cuda() for p in params]
    op = torch.ops.fusedtrain.linear_mse_train_step_
    op(x, target, *params, reference.MEAN, state, **hyper)  # the stream's first step zeroes its ticket counter
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        op(x, target, *params, reference.MEAN, state, **hyper)
        torch.cuda.synchronize()
    on_device = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(on_device) == 1 and "fused_linear_mse" in on_device[0], on_device


def test_train_step_on_cuda_rejects_bad_arguments_before_changing_anything():
    weight, bias = torch.randn(4, 8, device="cuda"), torch.randn(4, device="cuda")
    x, target = torch.randn(64, 8, device="cuda"), torch.randn(64, 4, device="cuda")
    state = [torch.zeros_like(weight), torch.zeros_like(bias), torch.ones_like(weight), torch.ones_like(bias),
             torch.tensor(0.0), torch.tensor(0.0, device="cuda")]
    hyper = train_step_hyper(adam=True)
    before = [t.clone() for t in [weight, bias] + state]
    op = torch.ops.fusedtrain.linear_mse_train_step_
    with pytest.raises(ValueError, match=r"steps\[0\] is on cpu"):
        op(x, target, weight, bias, reference.MEAN, state, **hyper)
    state[4] = torch.tensor(0.0, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"steps\[0\] must be float32"):
        op(x, target, weight, bias, reference.MEAN, state, **hyper)
    state[4] = torch.tensor(0.0, device="cuda")
    with pytest.raises(ValueError, match="weight must be contiguous"):
        op(x, target, torch.randn(8, 4, device="cuda").t(), bias, reference.MEAN, state, **hyper)
    with pytest.raises(ValueError, match="state has 5 tensors, expected 6"):
        op(x, target, weight, bias, reference.MEAN, state[:5], **hyper)
    torch.cuda.synchronize()
    for b, a in zip(before, [weight, bias] + state):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)
