"""The fused linear + MSE head: the op, fusedtrain.nn.functional.linear_mse_loss, LinearMSELoss
and MSELoss, against the stock ops (nn.functional.linear + mse_loss, autograd) in fp64."""

import warnings

import pytest
import torch

import fusedtrain
from fusedtrain import reference
from fusedtrain.nn import LinearMSELoss, MSELoss
from fusedtrain.nn.functional import linear_mse_loss

native = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")


def rel_err(got, want):
    want = want.double()
    return float((got.double() - want).norm() / max(want.norm(), 1e-30))


def stock(x, weight, bias, target, reduction):
    """Loss and gradients of the unfused loop, by autograd, in fp64."""
    x, weight = x.double().detach().requires_grad_(), weight.double().detach().requires_grad_()
    bias = bias.double().detach().requires_grad_() if bias is not None else None
    loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, weight, bias), target.double(),
                                        reduction=reduction)
    loss.backward()
    return loss.detach(), weight.grad, bias.grad if bias is not None else None, x.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("n,inp,out", [(n, i, o) for n in (1, 7, 1000) for i in (1, 3, 64, 1024)
                                       for o in (1, 2, 16, 128)])
def test_loss_and_gradients_match_stock(n, inp, out, has_bias, reduction, dtype, tol):
    g = torch.Generator().manual_seed(n * 10007 + inp * 101 + out)
    x = torch.randn(n, inp, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(out, inp, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(out, generator=g, dtype=dtype, requires_grad=True) if has_bias else None
    target = torch.randn(n, out, generator=g, dtype=dtype)

    loss = linear_mse_loss(x, weight, bias, target, reduction)
    loss.backward()
    want_loss, want_w, want_b, want_x = stock(x, weight, bias, target, reduction)
    assert loss.dtype == dtype
    assert rel_err(loss.detach(), want_loss) <= tol
    assert rel_err(weight.grad, want_w) <= tol
    assert rel_err(x.grad, want_x) <= tol
    if has_bias:
        assert rel_err(bias.grad, want_b) <= tol


@pytest.mark.parametrize("needs", ["x", "weight", "bias", "nothing"])
def test_only_requested_gradients_are_computed(needs):
    x = torch.randn(9, 5, requires_grad=needs == "x")
    weight = torch.randn(3, 5, requires_grad=needs == "weight")
    bias = torch.randn(3, requires_grad=needs == "bias")
    loss = linear_mse_loss(x, weight, bias, torch.randn(9, 3))
    assert loss.requires_grad == (needs != "nothing")
    if needs != "nothing":
        loss.backward()
        assert (x.grad is not None, weight.grad is not None, bias.grad is not None) == (
            needs == "x", needs == "weight", needs == "bias")


def test_no_grad_gives_the_loss_without_autograd():
    x, weight, bias = torch.randn(6, 4), torch.randn(2, 4, requires_grad=True), torch.randn(2)
    target = torch.randn(6, 2)
    with torch.no_grad():
        loss = linear_mse_loss(x, weight, bias, target)
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(x @ weight.T + bias, target))


def test_large_output_in_several_row_blocks():
    """out = 2048 puts 1024 rows in a block of the GEMM path: 3000 rows take three blocks."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3000, 8, generator=g, requires_grad=True)
    weight = torch.randn(2048, 8, generator=g, requires_grad=True)
    bias = torch.randn(2048, generator=g, requires_grad=True)
    target = torch.randn(3000, 2048, generator=g)
    linear_mse_loss(x, weight, bias, target).backward()
    want_loss, want_w, want_b, want_x = stock(x, weight, bias, target, "mean")
    assert rel_err(weight.grad, want_w) <= 1e-5
    assert rel_err(bias.grad, want_b) <= 1e-5
    assert rel_err(x.grad, want_x) <= 1e-5


def test_backward_scales_by_grad_output():
    x, weight = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 2, dtype=torch.float64)
    (3.5 * linear_mse_loss(x, weight, None, target)).backward()
    want = torch.autograd.grad(3.5 * torch.nn.functional.mse_loss(x @ weight.T, target), weight)[0]
    torch.testing.assert_close(weight.grad, want)


def test_gradcheck_fp64():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 3, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda a, w, b: linear_mse_loss(a, w, b, target, reduction),
                                        (x, weight, bias))


@pytest.mark.parametrize("target_shape", [(7, 3), (3,), (1, 3), (7, 1), (2, 7, 3)])
def test_target_broadcasting_and_warning_follow_mse_loss(target_shape):
    """Whatever mse_loss does with a target shape (broadcast, warn), linear_mse_loss does too."""
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(target_shape, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as want_warnings:
        warnings.simplefilter("always")
        want = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, weight), target)
    with warnings.catch_warnings(record=True) as got_warnings:
        warnings.simplefilter("always")
        got = linear_mse_loss(x, weight, None, target)
    assert [str(w.message) for w in got_warnings] == [str(w.message) for w in want_warnings]
    torch.testing.assert_close(got, want)
    want_grad = torch.autograd.grad(want, weight)[0]
    torch.testing.assert_close(torch.autograd.grad(got, weight)[0], want_grad)


def test_batch_dimensions_and_reduction_none():
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    weight, bias = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    target = torch.randn(2, 4, 3, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            linear_mse_loss(x, weight, bias, target, reduction),
            torch.nn.functional.mse_loss(torch.nn.functional.linear(x, weight, bias), target, reduction=reduction))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        linear_mse_loss(x, weight, bias, target, "avg")


@native
@pytest.mark.parametrize("out", [2, 40])  # the fused row loop and the GEMM path
def test_opcheck(out):
    x, weight, bias = torch.randn(5, 3), torch.randn(out, 3), torch.randn(out)
    target = torch.randn(5, out)
    for args in [(x, weight, bias, target, 1, True, True), (x, weight, None, target, 2, False, True),
                 (x, weight, bias, target, 1, False, False)]:
        torch.library.opcheck(torch.ops.fusedtrain.linear_mse_fwd_bwd.default, args)


@native
def test_op_matches_reference_and_every_instruction_set_agrees():
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(300, 70, generator=g), torch.randn(5, 70, generator=g), torch.randn(5, generator=g),
            torch.randn(300, 5, generator=g), 1, True, True)
    want = reference.linear_mse_fwd_bwd(*args)
    results = {}
    for isa in fusedtrain._extension._C.supported_cpu_isas():
        fusedtrain._extension._C.set_cpu_isa(isa)
        results[isa] = torch.ops.fusedtrain.linear_mse_fwd_bwd(*args)
        for got, ref in zip(results[isa], want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for isa, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, results["baseline"])), isa


@native
@pytest.mark.parametrize("bad,match", [
    ("x_3d", "x must be 2-D"), ("weight_shape", "weight must have shape"), ("dtype", "has dtype"),
    ("target_shape", "target must have shape"), ("reduction", "reduction must be"), ("bias_shape", "bias must have shape"),
])
def test_op_names_the_bad_argument(bad, match):
    x, weight, bias, target, reduction = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2), torch.randn(4, 2), 1
    if bad == "x_3d":
        x = x[None]
    elif bad == "weight_shape":
        weight = torch.randn(2, 4)
    elif bad == "dtype":
        weight = weight.double()
    elif bad == "target_shape":
        target = torch.randn(4)
    elif bad == "reduction":
        reduction = 0
    else:
        bias = torch.randn(3)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.fusedtrain.linear_mse_fwd_bwd(x, weight, bias, target, reduction, True)


def test_linear_mse_module_is_named_and_initialised_like_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 2)
    torch.manual_seed(0)
    head = LinearMSELoss(6, 2)
    assert head.state_dict().keys() == linear.state_dict().keys()
    for key, value in linear.state_dict().items():
        torch.testing.assert_close(head.state_dict()[key], value)
    head.load_state_dict(linear.state_dict())
    linear.load_state_dict(head.state_dict())
    x, y = torch.randn(10, 6), torch.randn(10, 2)
    torch.testing.assert_close(head.predict(x), linear(x))
    torch.testing.assert_close(head(x, y), torch.nn.functional.mse_loss(linear(x), y))
    assert LinearMSELoss(3, 1, bias=False).bias is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shapes", [((6, 3), (6, 3)), ((6, 1), (6,)), ((4, 3), (3,))])
def test_mse_loss_module_matches_nn(reduction, shapes):
    input_shape, target_shape = shapes
    a = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(target_shape, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torch.nn.MSELoss(reduction=reduction)(a, t)
        got = MSELoss(reduction=reduction)(a, t)
    torch.testing.assert_close(got, want)
    grad_out = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (a, t), grad_out),
                               torch.autograd.grad(want, (a, t), grad_out))


DEPTH1_UPDATES = {
    # the stack train step op, its state lists (params -> tuple of lists) and hyperparameters
    "adam": ("stack_adam_step_", lambda ps: ([torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                                             [], [torch.tensor(0.0) for _ in ps]),
             (0.01, 0.9, 0.99, 1e-8, 0.1, False, False, False)),
    "adamw-amsgrad-maximize": ("stack_adam_step_", lambda ps: tuple([torch.zeros_like(p) for p in ps] for _ in range(3))
                               + ([torch.tensor(0.0) for _ in ps],), (0.02, 0.8, 0.9, 1e-6, 0.1, True, True, True)),
    "sgd": ("stack_sgd_step_", lambda ps: ([],), (0.05, 0.0, 0.0, 0.0, False, False, False)),
    "sgd-nesterov-maximize": ("stack_sgd_step_", lambda ps: ([torch.empty_like(p) for p in ps],),
                              (0.05, 0.9, 0.0, 0.01, True, True, True)),
}


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("update", DEPTH1_UPDATES.values(), ids=DEPTH1_UPDATES.keys())
def test_linear_mse_is_the_depth_1_stack_of_the_train_step_ops(update, has_bias):
    """One nn.Linear under MSE is the stack of depth 1: the train step ops run it with the linear
    kernels, and agree with the reference's stack step over three steps (SGD's first step starts
    the momentum buffers)."""
    name, make_state, hyper = update
    g = torch.Generator().manual_seed(5)
    x, target = torch.randn(40, 6, generator=g), torch.randn(40, 3, generator=g)
    spec = fusedtrain.stacks.describe(torch.nn.Linear(6, 3, bias=has_bias), torch.nn.MSELoss()).spec
    ref_params = [torch.randn(3, 6, generator=g)] + ([torch.randn(3, generator=g)] if has_bias else [])
    op_params = [p.clone() for p in ref_params]
    ref_state, op_state = make_state(ref_params), make_state(op_params)
    for step in range(3):
        step_hyper = hyper if name == "stack_adam_step_" else (*hyper[:-1], hyper[-1] and step == 0)
        want = getattr(reference, name)(x, target, ref_params, *spec, *ref_state, *step_hyper)
        got = getattr(torch.ops.fusedtrain, name)(x, target, op_params, *spec, *op_state, *step_hyper)
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(op_params, ref_params)
    torch.testing.assert_close(op_state, ref_state)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_matches_stock_in_op_and_reference(reduction):
    x, target = torch.randn(0, 3), torch.randn(0, 2)
    weight, bias = torch.randn(2, 3), torch.randn(2)
    want = stock(x, weight, bias, target, reduction)
    code = reference.MEAN if reduction == "mean" else reference.SUM
    for run in (torch.ops.fusedtrain.linear_mse_fwd_bwd, reference.linear_mse_fwd_bwd):
        got = run(x, weight, bias, target, code, True)
        torch.testing.assert_close(got, want, equal_nan=True, check_dtype=False)
