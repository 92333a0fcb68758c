"""The torch.ops.fusedtrain optimizer ops themselves: opcheck, every CPU instruction set against
the reference, layouts the kernel must handle, GradScaler's grad_scale/found_inf, NaN/inf."""

import pytest
import torch

import fusedtrain
from fusedtrain import reference

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(),
                                reason="native extension not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def adam_args(dtype, shapes, amsgrad=True, seed=0, make=torch.randn):
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return make(shape, generator=g, dtype=torch.float32).to(dtype)

    params = [rand(s) for s in shapes]
    grads = [rand(s) for s in shapes]
    exp_avgs = [rand(s) * 0.1 for s in shapes]
    exp_avg_sqs = [rand(s).abs() * 0.01 for s in shapes]
    max_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(k + 1)) for k in range(len(shapes))]
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps]


def sgd_args(dtype, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda s: torch.randn(s, generator=g).to(dtype)  # noqa: E731
    return [[rand(s) for s in shapes], [rand(s) for s in shapes], [rand(s) for s in shapes]]


def clone_args(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a for a in args]


ADAM_HYPER = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=False,
                  amsgrad=True, maximize=False)
SGD_HYPER = dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.05, nesterov=False,
                 maximize=True, first_step=False)
SHAPES = [(3, 5), (70000,), (), (0,), (129,)]  # big enough to cross a chunk and go parallel


def test_opcheck_adam():
    args = adam_args(torch.float32, [(3, 5), (7,)])
    torch.library.opcheck(torch.ops.fusedtrain.adam_step_.default, (*args, *ADAM_HYPER.values()))


def test_opcheck_adam_with_grad_scale():
    args = adam_args(torch.float32, [(4,), (2, 3)], amsgrad=False)
    hyper = dict(ADAM_HYPER, amsgrad=False)
    kwargs = {"grad_scale": torch.tensor(8.0), "found_inf": torch.tensor(0.0)}
    torch.library.opcheck(torch.ops.fusedtrain.adam_step_.default, (*args, *hyper.values()), kwargs)


@pytest.mark.parametrize("first_step", [False, True])
def test_opcheck_sgd(first_step):
    args = sgd_args(torch.float32, [(3, 5), (7,)])
    hyper = dict(SGD_HYPER, first_step=first_step)
    torch.library.opcheck(torch.ops.fusedtrain.sgd_step_.default, (*args, *hyper.values()))


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("implementation", ["native", "reference"])
@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_lr_tensor_replaces_the_float_lr(op, implementation, lr_dtype):
    make_args, hyper = (adam_args, ADAM_HYPER) if op == "adam" else (sgd_args, SGD_HYPER)
    run = (getattr(torch.ops.fusedtrain, f"{op}_step_") if implementation == "native"
           else getattr(reference, f"{op}_step_"))
    want = make_args(torch.float32, [(3, 5), (7,)])
    got = clone_args(want)
    run(*want, **hyper)
    run(*got, **dict(hyper, lr=123.0), lr_tensor=torch.tensor(hyper["lr"], dtype=lr_dtype))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_opcheck_with_lr_tensor():
    args = adam_args(torch.float32, [(4,), (2, 3)])
    torch.library.opcheck(torch.ops.fusedtrain.adam_step_.default, (*args, *ADAM_HYPER.values()),
                          {"lr_tensor": torch.tensor(0.02)})
    args = sgd_args(torch.float32, [(4,), (2, 3)])
    torch.library.opcheck(torch.ops.fusedtrain.sgd_step_.default, (*args, *SGD_HYPER.values()),
                          {"lr_tensor": torch.tensor(0.02)})


def hyper_tensor_call(op):
    """(op, args) of the torch.compile form of `op` (adam or sgd): the float hyperparameters in
    one float64 tensor, in the schema's order; and the same call through the op itself."""
    if op == "adam":
        floats, flags = ("lr", "beta1", "beta2", "eps", "weight_decay"), ("decoupled", "amsgrad", "maximize")
        make_args, hyper = adam_args, ADAM_HYPER
    else:
        floats, flags = ("lr", "momentum", "dampening", "weight_decay"), ("nesterov", "maximize", "first_step")
        make_args, hyper = sgd_args, SGD_HYPER
    args = make_args(torch.float32, [(3, 5), (7,)])
    values = torch.tensor([hyper[k] for k in floats], dtype=torch.float64)
    return (getattr(torch.ops.fusedtrain, f"{op}_step_hyper_tensor_").default,
            (*args, values, *(hyper[k] for k in flags)), (*clone_args(args), *hyper.values()))


@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_hyper_tensor_form_equals_the_op(op):
    traced_op, args, plain_args = hyper_tensor_call(op)
    traced_op(*args)
    getattr(torch.ops.fusedtrain, f"{op}_step_")(*plain_args)
    tensor_lists = lambda call_args: [a for a in call_args if isinstance(a, list)]  # noqa: E731
    torch.testing.assert_close(tensor_lists(args), tensor_lists(plain_args), rtol=0, atol=0)
    torch.library.opcheck(traced_op, hyper_tensor_call(op)[1])


def test_hyper_tensor_of_the_wrong_kind_is_refused():
    traced_op, args, _ = hyper_tensor_call("adam")
    with pytest.raises(ValueError, match="hyper must be a float64 CPU tensor of 5 elements"):
        traced_op(*args[:6], args[6].float(), *args[7:])


@pytest.mark.parametrize("lr_tensor,message", [
    (torch.tensor([0.1, 0.2]), "lr_tensor must have one element"),
    (torch.tensor(1, dtype=torch.int64), "lr_tensor must be float32 or float64"),
])
def test_bad_lr_tensor_is_refused_before_any_change(lr_tensor, message):
    args = adam_args(torch.float32, [(3,)])
    before = clone_args(args)
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fusedtrain.adam_step_(*args, **ADAM_HYPER, lr_tensor=lr_tensor)
    torch.testing.assert_close(args, before, rtol=0, atol=0)


def check_every_instruction_set(make_args, op, reference_op, hyper, tolerance):
    """Each instruction set's loop against the plain-PyTorch reference, and bit for bit against
    the baseline loop (the build disables FMA contraction so all of them round alike)."""
    expected = make_args()
    reference_op(*expected, **hyper)
    results = {}
    for isa in fusedtrain._extension._C.supported_cpu_isas():
        fusedtrain._extension._C.set_cpu_isa(isa)
        results[isa] = make_args()
        op(*results[isa], **hyper)
        for got, want in zip(results[isa], expected):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **tolerance)
    for isa, args in results.items():
        for got, base in zip(args, results["baseline"]):
            assert all(torch.equal(g, b) for g, b in zip(got, base)), f"{isa} differs from baseline"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_every_instruction_set_matches_reference(dtype, decoupled):
    # fp32: the kernel multiplies by 1 / sqrt(1 - beta2^t) where the reference divides
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
    check_every_instruction_set(lambda: adam_args(dtype, SHAPES), torch.ops.fusedtrain.adam_step_,
                                reference.adam_step_, dict(ADAM_HYPER, decoupled=decoupled), tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first_step,nesterov", [(True, False), (False, False), (False, True)])
def test_sgd_every_instruction_set_matches_reference(dtype, first_step, nesterov):
    hyper = dict(SGD_HYPER, first_step=first_step, nesterov=nesterov, dampening=0.0 if nesterov else 0.1)
    check_every_instruction_set(lambda: sgd_args(dtype, SHAPES), torch.ops.fusedtrain.sgd_step_,
                                reference.sgd_step_, hyper, {})


def test_unknown_instruction_set_is_refused():
    with pytest.raises(ValueError, match="not supported by this CPU"):
        fusedtrain._extension._C.set_cpu_isa("avx9000")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "grad_other_strides", "channels_last"])
def test_non_contiguous_tensors(layout):
    """Dense layouts shared by all tensors run in place; anything else through staged copies.
    Either way the result equals the contiguous computation and lands in the caller's tensors."""
    base = adam_args(torch.float32, [(6, 8, 5, 4)], amsgrad=True)
    expected = clone_args(base)
    reference.adam_step_(*expected, **ADAM_HYPER)

    def relayout(t, role):
        if layout == "transposed":
            return t.transpose(0, 3).contiguous().transpose(0, 3)
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "sliced":  # every tensor a strided view into a bigger buffer
            big = torch.zeros(12, 8, 5, 4, dtype=t.dtype)
            big[::2] = t
            return big[::2]
        return t.transpose(1, 2).contiguous().transpose(1, 2) if role == "grads" else t

    roles = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    args = [[relayout(t, role) for t in lst] for role, lst in zip(roles, base[:5])] + [base[5]]
    torch.ops.fusedtrain.adam_step_(*args, **ADAM_HYPER)
    for got, want in zip(args, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_empty_and_zero_dim_params():
    args = adam_args(torch.float32, [(), (0,), (0, 4)])
    expected = clone_args(args)
    torch.ops.fusedtrain.adam_step_(*args, **ADAM_HYPER)
    reference.adam_step_(*expected, **ADAM_HYPER)
    for got, want in zip(args, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_adam_increments_each_step_once():
    args = adam_args(torch.float32, [(40000,), (3,)])
    steps_before = [s.item() for s in args[5]]
    torch.ops.fusedtrain.adam_step_(*args, **ADAM_HYPER)
    assert [s.item() for s in args[5]] == [s + 1 for s in steps_before]


@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_found_inf_skips_everything(op):
    if op == "adam":
        args = adam_args(torch.float32, SHAPES)
        call = lambda a, **kw: torch.ops.fusedtrain.adam_step_(*a, **ADAM_HYPER, **kw)  # noqa: E731
    else:
        args = sgd_args(torch.float32, SHAPES)
        call = lambda a, **kw: torch.ops.fusedtrain.sgd_step_(*a, **SGD_HYPER, **kw)  # noqa: E731
    before = clone_args(args)
    call(args, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    for got, want in zip(args, before):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_matches_torch_fused(dtype):
    """With grad_scale the grads are divided, stored back and used, as torch._fused_adam_ does."""
    args = adam_args(dtype, [(1000,), (7, 3)], amsgrad=False)
    torch_args = clone_args(args)
    for s in torch_args[5]:
        s += 1  # torch's fused kernel expects the step already incremented
    hyper = dict(ADAM_HYPER, amsgrad=False)
    scale = torch.tensor(1024.0)
    torch.ops.fusedtrain.adam_step_(*args, **hyper, grad_scale=scale, found_inf=torch.tensor(0.0))
    torch._fused_adam_(*torch_args, lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                       weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=False,
                       maximize=False, grad_scale=scale, found_inf=torch.tensor(0.0))
    for got, want in zip(args, torch_args):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_nan_and_inf_propagate_as_in_torch():
    p = torch.nn.Parameter(torch.ones(40))
    ref = torch.nn.Parameter(torch.ones(40))
    grad = torch.randn(40)
    grad[3], grad[17], grad[30] = float("nan"), float("inf"), -float("inf")
    p.grad, ref.grad = grad.clone(), grad.clone()
    opt = fusedtrain.optim.Adam([p], weight_decay=0.1, amsgrad=True)
    torch_opt = torch.optim.Adam([ref], weight_decay=0.1, amsgrad=True, foreach=False)
    for _ in range(3):
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(p, ref, equal_nan=True)
    for key in torch_opt.state[ref]:
        torch.testing.assert_close(opt.state[p][key], torch_opt.state[ref][key], equal_nan=True)
