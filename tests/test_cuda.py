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
