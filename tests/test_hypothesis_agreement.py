"""Property-based agreement: random shapes (0-dim and empty included), dtypes and hyperparameters,
fusedtrain against torch.optim and the stock loss, and the native op against fusedtrain.reference.

Deterministic (derandomize=True: the same examples every run), over 1000 examples in all, on
tensors of a few elements so that the whole file stays fast.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedtrain
import fusedtrain.nn.functional
import fusedtrain.optim
from fusedtrain import reference

settings.register_profile(
    "fusedtrain-agreement", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
AGREEMENT = settings.get_profile("fusedtrain-agreement")

# dtype -> tolerances after a few steps. 16-bit params are held to fp32 math rounded into them
# after every step (Fp32Oracle), so a value may sit one rounding away.
DTYPES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},
}

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
param_shapes = st.lists(shapes, min_size=1, max_size=3)
seeds = st.integers(0, 2**31 - 1)
learning_rates = st.sampled_from([0.0, 1e-3, 0.01, 0.1, 0.5])
weight_decays = st.sampled_from([0.0, 1e-3, 0.1, 1.0])


@st.composite
def adam_configs(draw):
    return {
        "lr": draw(learning_rates),
        "betas": (draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])), draw(st.sampled_from([0.0, 0.9, 0.999]))),
        "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3, 0.1])),
        "weight_decay": draw(weight_decays),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }


@st.composite
def sgd_configs(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]))
    dampening = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return {
        "lr": draw(learning_rates),
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": draw(weight_decays),
        "nesterov": momentum > 0 and dampening == 0 and draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }


@st.composite
def optimizer_configs(draw):
    name = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    return name, draw(sgd_configs() if name == "SGD" else adam_configs())


class Fp32Oracle:
    """torch.optim (for-loop) on fp32 copies of 16-bit params, the params and state rounded to
    the 16-bit dtype after each step: fp32 math with 16-bit storage, as the kernels compute."""

    def __init__(self, name, params, **kwargs):
        self.params = params
        self.shadows = [torch.nn.Parameter(p.detach().float()) for p in params]
        self.opt = getattr(torch.optim, name)(self.shadows, foreach=False, **kwargs)

    def state_of(self, index):
        return self.opt.state[self.shadows[index]]

    @torch.no_grad()
    def step(self):
        for p, s in zip(self.params, self.shadows):
            s.copy_(p.float())
            s.grad = p.grad.float()
        self.opt.step()
        for p, s in zip(self.params, self.shadows):
            p.copy_(s)
            for key, value in self.opt.state[s].items():
                if key != "step":
                    value.copy_(value.to(p.dtype))


class TorchOracle:
    def __init__(self, name, params, **kwargs):
        self.opt = getattr(torch.optim, name)(params, foreach=False, **kwargs)
        self.params = params

    def state_of(self, index):
        return self.opt.state[self.params[index]]

    def step(self):
        self.opt.step()


def random_params(shapes_, dtype, generator):
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)) for s in shapes_]


@settings(AGREEMENT, max_examples=700)
@given(optimizer=optimizer_configs(), dtype=st.sampled_from(list(DTYPES)), shapes_=param_shapes,
       steps=st.integers(1, 3), seed=seeds)
def test_optimizer_steps_agree_with_torch(optimizer, dtype, shapes_, steps, seed):
    name, config = optimizer
    g = torch.Generator().manual_seed(seed)
    fused_params = random_params(shapes_, dtype, g)
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    oracle_type = TorchOracle if dtype in (torch.float32, torch.float64) else Fp32Oracle
    oracle = oracle_type(name, torch_params, **config)
    fused = getattr(fusedtrain.optim, name)(fused_params, **config)
    for _ in range(steps):
        for fp, tp in zip(fused_params, torch_params):
            grad = torch.randn(fp.shape, generator=g, dtype=torch.float64).to(dtype)
            fp.grad, tp.grad = grad.clone(), grad.clone()
        oracle.step()
        fused.step()
    tolerance = DTYPES[dtype]
    for index, (fp, tp) in enumerate(zip(fused_params, torch_params)):
        torch.testing.assert_close(fp, tp, **tolerance)
        want_state = oracle.state_of(index)
        assert fused.state[fp].keys() == want_state.keys()
        for key, value in want_state.items():
            torch.testing.assert_close(fused.state[fp][key], value, check_dtype=False, **tolerance)


@st.composite
def linear_problems(draw):
    """(x, weight, bias, target) with x of 1 to 3 dims (any of them may be empty) and a target
    of the prediction's shape, or one that broadcasts to it."""
    batch = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    inp, out = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    pred_shape = (*batch, out)
    target_shape = draw(st.sampled_from([pred_shape, (out,), (*batch[:-1], 1, out) if batch else (1, out)]))
    return tuple(batch), inp, out, target_shape, draw(st.booleans())


@settings(AGREEMENT, max_examples=250)
@given(problem=linear_problems(), dtype=st.sampled_from([torch.float32, torch.float64]),
       reduction=st.sampled_from(["mean", "sum"]), seed=seeds)
def test_linear_mse_loss_agrees_with_the_stock_loss(problem, dtype, reduction, seed):
    batch, inp, out, target_shape, has_bias = problem
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn((*batch, inp), generator=g, dtype=dtype), torch.randn(out, inp, generator=g, dtype=dtype),
               torch.randn(out, generator=g, dtype=dtype) if has_bias else None,
               torch.randn(target_shape, generator=g, dtype=dtype)]
    results = []
    for loss_fn in (fusedtrain.nn.functional.linear_mse_loss,
                    lambda x, w, b, y, reduction: F.mse_loss(F.linear(x, w, b), y, reduction=reduction)):
        leaves = [t.clone().requires_grad_() if t is not None and i < 3 else t for i, t in enumerate(tensors)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = loss_fn(*leaves, reduction=reduction)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves[:3] if t is not None],
                        [str(w.message) for w in caught]))
    (got, got_grads, got_warnings), (want, want_grads, want_warnings) = results
    tolerance = DTYPES[dtype]
    torch.testing.assert_close(got, want, equal_nan=True, **tolerance)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tolerance)
    assert got_warnings == want_warnings


@pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")
@settings(AGREEMENT, max_examples=200)
@given(n=st.integers(1, 9), inp=st.integers(1, 6), out=st.integers(1, 6), has_bias=st.booleans(),
       reduction=st.sampled_from([reference.MEAN, reference.SUM]), need_grad_x=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=seeds)
def test_linear_mse_op_agrees_with_the_reference(n, inp, out, has_bias, reduction, need_grad_x, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(n, inp, generator=g, dtype=dtype), torch.randn(out, inp, generator=g, dtype=dtype)
    bias = torch.randn(out, generator=g, dtype=dtype) if has_bias else None
    target = torch.randn(n, out, generator=g, dtype=dtype)
    got = torch.ops.fusedtrain.linear_mse_fwd_bwd(x, weight, bias, target, reduction, need_grad_x, True)
    want = reference.linear_mse_fwd_bwd(x, weight, bias, target, reduction, need_grad_x, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **DTYPES[dtype])


@pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")
@pytest.mark.parametrize("out", [1, 2])
def test_linear_mse_op_without_in_features(out):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 0, generator=g), torch.randn(out, 0, generator=g)
    bias, target = torch.randn(out, generator=g), torch.randn(5, out, generator=g)
    got = torch.ops.fusedtrain.linear_mse_fwd_bwd(x, weight, bias, target, reference.MEAN, True, True)
    want = reference.linear_mse_fwd_bwd(x, weight, bias, target, reference.MEAN, True, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
