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


def train_step_cases():
    """Every optimizer at out 1 and 16 (one fused launch; 33 columns: rows split over the blocks,
    3000: columns too) and 40 (GEMMs), each dtype and with and without bias at each out."""
    shapes = [(1, 33), (16, 3000), (40, 33)]
    for i, optimizer in enumerate(TRAIN_STEP_OPTIMIZERS):
        for j, (out, inp) in enumerate(shapes):
            dtype = [torch.float32, torch.float64][(i + j) % 2]
            has_bias = (i // 2 + j) % 2 == 0
            yield pytest.param(optimizer, out, inp, dtype, has_bias,
                               id=f"{optimizer}-out{out}-in{inp}-{str(dtype)[6:]}-{'bias' if has_bias else 'no bias'}")


@pytest.mark.parametrize("optimizer,out,inp,dtype,has_bias", list(train_step_cases()))
def test_linear_mse_train_step_matches_reference(optimizer, out, inp, dtype, has_bias):
    hyper = train_step_hyper(**TRAIN_STEP_OPTIMIZERS[optimizer])
    x, target, params, g = train_step_problem(dtype, 9000, inp, out, has_bias, seed=out * 2 + has_bias)
    state = train_step_state(params, hyper, g)
    gpu_params, gpu_state = [p.cuda() for p in params], [s.cuda() for s in state]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    # Consecutive steps on batches whose grids differ (every block looping over rows, 2, 1, 16):
    # nothing may carry over from one launch to the next.
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
    op(x, target, *params, reference.MEAN, state, **hyper)  # a first call sizes the grid
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


# ---- The train step under CUDA graphs, its memory at large `in` -------------------------------

def cuda_train_step_problem(out, has_bias, hyper, seed, n=300, inp=40):
    """x, target, params and state on the GPU (random state, as train_step_state makes it)."""
    x, target, params, g = train_step_problem(torch.float32, n, inp, out, has_bias, seed=seed)
    state = train_step_state(params, hyper, g)
    return x.cuda(), target.cuda(), [p.cuda() for p in params], [s.cuda() for s in state]


@pytest.mark.parametrize("out", [4, 40])
@pytest.mark.parametrize("optimizer", ["adamw-amsgrad-maximize", "sgd-nesterov-resumed-maximize"])
def test_captured_train_step_replays_like_eager_steps(out, optimizer):
    """linear_mse_train_step_ captured once (after a warm-up), replayed on new batches copied into
    the static inputs, against the same op run eagerly on twins of the params and state: one
    fused cooperative launch for out 4 (bit for bit: its sums run in a fixed order), GEMMs and
    the optimizer kernels for out 40 (its loss is summed with atomics, in no fixed order)."""
    hyper = train_step_hyper(**TRAIN_STEP_OPTIMIZERS[optimizer])
    x, target, params, state = cuda_train_step_problem(out, True, hyper, seed=out)
    twin_params, twin_state = [p.clone() for p in params], [s.clone() for s in state]
    g = torch.Generator(device="cuda").manual_seed(3)
    batches = [(torch.randn(x.shape, generator=g, device="cuda"), torch.randn(target.shape, generator=g, device="cuda"))
               for _ in range(5)]
    op = torch.ops.fusedtrain.linear_mse_train_step_
    static_x, static_target = x.clone(), target.clone()
    tol = dict(rtol=0, atol=0) if out <= 16 else dict(rtol=1e-4, atol=1e-5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS handles, the grid's occupancy query)
        op(static_x, static_target, *params, reference.MEAN, state, **hyper)
    torch.cuda.current_stream().wait_stream(side)
    op(static_x, static_target, *twin_params, reference.MEAN, twin_state, **hyper)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = op(static_x, static_target, *params, reference.MEAN, state, **hyper)
    for bx, by in batches:
        static_x.copy_(bx)
        static_target.copy_(by)
        graph.replay()
        want = op(bx, by, *twin_params, reference.MEAN, twin_state, **hyper)
        torch.testing.assert_close(static_loss, want, **tol)
    torch.cuda.synchronize()
    for got, want in zip(params + state, twin_params + twin_state):
        torch.testing.assert_close(got, want, **tol)


def test_two_captured_train_steps_replay_back_to_back_and_at_once():
    """Two train steps (two models) captured on the same stream, then replayed one after the other
    and at the same time on two streams: each equals the same steps run eagerly. Nothing is
    shared between launches (no counter per stream), so concurrent replays cannot interfere."""
    hyper = train_step_hyper(adam=True, amsgrad=True, weight_decay=0.1)
    problems = [cuda_train_step_problem(3, True, hyper, seed=40 + k, n=2000, inp=300) for k in range(2)]
    twins = [([p.clone() for p in params], [s.clone() for s in state]) for _, _, params, state in problems]
    op = torch.ops.fusedtrain.linear_mse_train_step_
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    graphs, losses = [], []
    for x, target, params, state in problems:
        with torch.cuda.stream(capture_stream):
            op(x, target, *params, reference.MEAN, state, **hyper)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            losses.append(op(x, target, *params, reference.MEAN, state, **hyper))
        graphs.append(graph)
    torch.cuda.current_stream().wait_stream(capture_stream)

    def eager_steps(count):
        wants = []
        for (x, target, _, _), (params, state) in zip(problems, twins):
            for _ in range(count):
                wants.append(op(x, target, *params, reference.MEAN, state, **hyper))
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
        for got, want in zip(params + state, twin_params + twin_state):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_narrow_train_step_at_large_in_stays_bounded_in_memory():
    """in = 2e6, out = 16, 256 rows: the fused kernel splits the columns over its blocks, so its
    scratch is one weight-sized partial gradient and small partial predictions (a partial
    gradient per block would take a weight per block, 128 MB each). One SGD step against the
    reference in fp64 on the GPU."""
    n, inp, out = 256, 2_000_000, 16
    gen = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(n, inp, generator=gen, device="cuda")
    target = torch.randn(n, out, generator=gen, device="cuda")
    weight = torch.randn(out, inp, generator=gen, device="cuda") * 1e-3
    bias = torch.randn(out, generator=gen, device="cuda")
    hyper = train_step_hyper(momentum=0.9, first_step=True)
    buffers = [torch.empty_like(weight), torch.empty_like(bias)]
    want_params = [weight.double(), bias.double()]
    want_buffers = [torch.empty_like(p) for p in want_params]
    want_loss = reference_train_step(x.double(), target.double(), want_params, reference.MEAN, want_buffers, hyper)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = torch.ops.fusedtrain.linear_mse_train_step_(x, target, weight, bias, reference.MEAN, buffers, **hyper)
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
    hyper = train_step_hyper(adam=True, amsgrad=True)
    x, target, params, state = cuda_train_step_problem(3, True, hyper, seed=50)
    calls = {
        "cuda linear_mse_train_step_": lambda xs, ts, ps, ss: torch.ops.fusedtrain.linear_mse_train_step_(
            xs, ts, *ps, reference.MEAN, ss, **hyper),
        "cuda linear_mse_fwd_bwd": lambda xs, ts, ps, ss: torch.ops.fusedtrain.linear_mse_fwd_bwd(
            xs, *ps, ts, reference.MEAN, True),
        "triton linear_mse_train_step_": lambda xs, ts, ps, ss: fusedtrain.triton.linear_mse_train_step_(
            xs, ts, *ps, reference.MEAN, ss, *[hyper[k] for k in TRITON_TRAIN_STEP_ARGS]),
        "triton linear_mse_fwd_bwd": lambda xs, ts, ps, ss: fusedtrain.triton.linear_mse_fwd_bwd(
            xs, *ps, ts, reference.MEAN, True),
    }
    for name, call in calls.items():
        on = {}
        for device in ("cuda:0", "cuda:1"):
            tensors = [x.to(device, copy=True), target.to(device, copy=True),
                       [p.to(device, copy=True) for p in params], [s.to(device, copy=True) for s in state]]
            result = call(*tensors)
            on[device] = [t.cpu() for t in (list(result) if isinstance(result, tuple) else [result])
                          + tensors[2] + tensors[3]]
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


# fusedtrain.triton.linear_mse_train_step_'s arguments after `state`, in order (first_step last).
TRITON_TRAIN_STEP_ARGS = ["adam", "lr", "weight_decay", "maximize", "beta1", "beta2", "eps", "decoupled",
                          "amsgrad", "momentum", "dampening", "nesterov", "first_step"]
