"""Bad input, one table: every case either raises a clear error naming the argument, with params,
grads, optimizer state and inputs bit-identical afterwards, or does exactly what torch does
with the same input (torch.optim for-loop, F.mse_loss(F.linear(...)), the stock training step).

Covers fusedtrain.optim.SGD/Adam/AdamW, fusedtrain.nn.functional.linear_mse_loss and
FusedTrainStep. test_optim_bad_input.py holds the older, narrower optimizer cases.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
import fusedtrain.nn.functional
import fusedtrain.optim
from child_process import run_python
from helpers import make_params

CONFIGS = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "Adam": {"lr": 0.1, "weight_decay": 0.1},
    "AdamW": {"lr": 0.1, "amsgrad": True},
}
HAS_CUDA = torch.cuda.is_available()


class Scenario(NamedTuple):
    action: Callable[[], Any]  # the call under test
    watch: Callable[[], dict]  # everything it may change, by name


class FusedSide:
    @staticmethod
    def optimizer(name, params, **kwargs):
        return getattr(fusedtrain.optim, name)(params, **kwargs)

    @staticmethod
    def linear_mse_loss(x, weight, bias, target, reduction="mean"):
        return fusedtrain.nn.functional.linear_mse_loss(x, weight, bias, target, reduction)

    @staticmethod
    def train_step(model, opt):
        return fusedtrain.FusedTrainStep(model, opt)


class TorchSide:
    @staticmethod
    def optimizer(name, params, **kwargs):
        return getattr(torch.optim, name)(params, foreach=False, **kwargs)

    @staticmethod
    def linear_mse_loss(x, weight, bias, target, reduction="mean"):
        return F.mse_loss(F.linear(x, weight, bias), target, reduction=reduction)

    @staticmethod
    def train_step(model, opt):
        def step(x, y):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        return step


# ---- scenario builders: each returns build(side) -> Scenario, the same inputs for both sides ----

def optimizer_watch(opt, params) -> Callable[[], dict]:
    def watch():
        # foreach and fused name torch's implementation choice: the sides differ there by design
        seen = {"param groups": [{k: v for k, v in g.items() if k not in ("params", "foreach", "fused")}
                                 | {"n": len(g["params"])} for g in opt.param_groups]} if opt is not None else {}
        for i, p in enumerate(params):
            seen[f"param {i}"] = p.detach()
            seen[f"grad {i}"] = p.grad if p.is_leaf else None
            for key, value in (opt.state.get(p, {}) if opt is not None else {}).items():
                seen[f"state {i} {key}"] = value
        return seen
    return watch


def grads_set(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
    return params


def two_groups(second: Callable[[], list]) -> Callable[[], list]:
    """A good first group and `second` (bad) after it: an error must come before group 0 moves."""
    return lambda: [grads_set(make_params(torch.float32, seed=2, shapes=[(4, 3), (5,)])), second()]


def optimizer_steps(name, groups: Callable[[], list], steps=3, setup=None, **overrides):
    """`steps` calls of step() on an optimizer over `groups()` (lists of params with grads);
    setup(opt), if given, runs first (a load_state_dict, a hyperparameter changed by hand)."""
    def build(side):
        param_groups = groups()
        params = [p for g in param_groups for p in g]
        opt = side.optimizer(name, [{"params": g} for g in param_groups], **{**CONFIGS[name], **overrides})
        if setup is not None:
            setup(opt, params)

        def action():
            for _ in range(steps):
                opt.step()
        return Scenario(action, optimizer_watch(opt, params))
    return build


def optimizer_construction(name, groups: Callable[[], list], **kwargs):
    def build(side):
        param_groups = groups()
        params = [p for g in param_groups for p in g]
        return Scenario(lambda: side.optimizer(name, [{"params": g} for g in param_groups], **kwargs),
                        optimizer_watch(None, params))
    return build


def optimizer_call(name, method: Callable):
    """method(opt, params) on an optimizer that has taken two steps: add_param_group, load_state_dict."""
    def build(side):
        params = grads_set(make_params(torch.float32, seed=3, shapes=[(4, 3), (5,), (2,)]))
        opt = side.optimizer(name, [{"params": params[:1]}, {"params": params[1:]}], **CONFIGS[name])
        opt.step()
        opt.step()
        return Scenario(lambda: method(opt, params), optimizer_watch(opt, params))
    return build


def loss_call(inputs: Callable[[], tuple], reduction="mean", backward=True):
    """linear_mse_loss(*inputs()) (and its backward); inputs that require grad get theirs compared."""
    def build(side):
        tensors = inputs()
        result = {}

        def action():
            loss = side.linear_mse_loss(*tensors, reduction=reduction)
            result["loss"] = loss.detach()
            if backward and loss.requires_grad:
                loss.sum().backward()

        def watch():
            seen = dict(result)
            for i, t in enumerate(tensors):
                if isinstance(t, torch.Tensor):
                    seen[f"input {i}"] = t.detach()
                    seen[f"input {i} grad"] = t.grad
            return seen
        return Scenario(action, watch)
    return build


def step_call(data: Callable[[], tuple], dtype=torch.float32, steps=3, optimizer="Adam"):
    """`steps` training steps of nn.Linear(3, 2) on data(), after one stock step that gives the
    optimizer state; FusedTrainStep against the stock step. Grads are not compared: the fused
    step leaves them as they were."""
    def build(side):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2, dtype=dtype)
        opt = side.optimizer(optimizer, model.parameters(), **CONFIGS[optimizer])
        warm_x, warm_y = torch.randn(4, 3, dtype=dtype), torch.randn(4, 2, dtype=dtype)
        TorchSide.train_step(model, opt)(warm_x, warm_y)
        x, y = data()
        losses = {}

        def action():
            step = side.train_step(model, opt)
            for i in range(steps):
                losses[f"loss {i}"] = step(x, y)

        def watch():
            seen = dict(losses)
            params = list(model.parameters())
            for key, value in optimizer_watch(opt, params)().items():
                if not key.startswith("grad"):
                    seen[key] = value
            return seen
        return Scenario(action, watch)
    return build


# ---- inputs ----

def param_with_grad(shape, grad_shape=None, dtype=torch.float32, grad_dtype=None, seed=4):
    """A param whose .grad has another shape or dtype: torch's .grad setter refuses those, so
    the param's data is swapped under an existing grad (or grad_dtype is released)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(grad_shape or shape, generator=g))
    if grad_dtype is not None:
        p.grad_dtype = None
        p.grad = torch.randn(shape, generator=g, dtype=grad_dtype)
    else:
        p.grad = torch.randn(grad_shape or shape, generator=g)
        if grad_shape is not None:
            p.data = torch.randn(shape, generator=g)
    if dtype != torch.float32:
        p.data = p.data.to(dtype)
    return p


def complex_param():
    g = torch.Generator().manual_seed(22)
    p = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.complex64))
    p.grad = torch.randn(3, generator=g, dtype=torch.complex64)
    return p


def int_param():
    p = torch.arange(6)
    p.grad = torch.ones(6, dtype=torch.long)
    return p


def sparse_grad_param():
    g = torch.Generator().manual_seed(23)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    p.grad = torch.randn(4, 3, generator=g).to_sparse()
    return p


def cuda_param_with_cpu_grad():
    if not HAS_CUDA:
        pytest.skip("a grad on another device than its param needs a second real device (no CUDA here; "
                    "torch refuses to move a CPU param's data to meta)")
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    p.data = p.data.cuda()
    return p


def special_params(kind):
    """Params torch.optim takes as they are; each with a matching random grad."""
    def make():
        g = torch.Generator().manual_seed(5)
        if kind == "non-contiguous grads":
            params = make_params(torch.float32, seed=6, shapes=[(4, 3), (6, 5)])
            for p in params:
                p.grad = torch.randn(p.shape[::-1], generator=g).t()
            return params
        if kind == "non-contiguous params":
            base = [torch.randn(3, 4, generator=g), torch.randn(10, generator=g), torch.randn(2, 3, 4, 5, generator=g)]
            params = [torch.nn.Parameter(base[0].t()), torch.nn.Parameter(base[1][::2]),
                      torch.nn.Parameter(base[2].to(memory_format=torch.channels_last))]
        elif kind == "empty and 0-dim params":
            params = make_params(torch.float32, seed=7, shapes=[(), (0,), (0, 3), (4,), ()])
        elif kind == "nan and inf grads":
            params = grads_set(make_params(torch.float32, seed=8, shapes=[(6,), (2, 3)]))
            params[0].grad[1], params[0].grad[3], params[1].grad[1, 2] = float("nan"), float("inf"), float("-inf")
            return params
        elif kind == "nan and inf params":
            params = make_params(torch.float32, seed=9, shapes=[(6,), (2, 3)])
            with torch.no_grad():
                params[0][2], params[1][0, 1], params[1][1, 0] = float("nan"), float("inf"), float("-inf")
        elif kind == "params on cpu and meta":
            params = make_params(torch.float32, seed=10, shapes=[(4,), (3,)])
            params.insert(1, torch.nn.Parameter(torch.empty(5, device="meta")))
            params[1].grad = torch.empty(5, device="meta")
            return grads_set(params[:1]) + params[1:2] + grads_set(params[2:])
        else:
            raise AssertionError(kind)
        return grads_set(params)
    return lambda: [make()]


def set_group_value(key, value):
    def setup(opt, params):
        for group in opt.param_groups:
            group[key] = value
    return setup


def load_modified_state(change):
    """A state_dict of two steps, changed by change(state_dict), loaded before the steps."""
    def setup(opt, params):
        opt.step()
        opt.step()
        saved = opt.state_dict()
        change(saved)
        opt.load_state_dict(saved)
    return setup


def replace_state(index, key, value):
    return lambda saved: saved["state"][index].__setitem__(key, value)


def drop_state(index, key):
    return lambda saved: saved["state"][index].pop(key)


def linear_inputs(n=5, inp=3, out=2, dtype=torch.float32, grad=True, **changes):
    """(x, weight, bias, target) of a linear + MSE call; a change is a value or a function of
    the default tensor."""
    def make():
        g = torch.Generator().manual_seed(11)
        values = {
            "x": torch.randn(n, inp, generator=g, dtype=torch.float64).to(dtype),
            "weight": torch.randn(out, inp, generator=g, dtype=torch.float64).to(dtype),
            "bias": torch.randn(out, generator=g, dtype=torch.float64).to(dtype),
            "target": torch.randn(n, out, generator=g, dtype=torch.float64).to(dtype),
        }
        for key, change in changes.items():
            values[key] = change(values[key]) if callable(change) else change
        if grad:
            for key in ("weight", "bias"):
                if values[key] is not None and values[key].is_floating_point() and values[key].is_leaf:
                    values[key].requires_grad_()
        return values["x"], values["weight"], values["bias"], values["target"]
    return make


def step_data(n=6, dtype=torch.float32, **changes):
    def make():
        g = torch.Generator().manual_seed(12)
        values = {"x": torch.randn(n, 3, generator=g, dtype=dtype), "y": torch.randn(n, 2, generator=g, dtype=dtype)}
        for key, change in changes.items():
            values[key] = change(values[key]) if callable(change) else change
        return values["x"], values["y"]
    return make


def fill(index, value):
    def change(t):
        t = t.clone()
        t[index] = value
        return t
    return change


# ---- the table ----

class Raises(NamedTuple):
    error: type
    match: str  # a regex naming the argument
    torch_raises_too: bool = True  # torch raises the same type for this input (a drop-in must too)


TORCH = "same as torch"  # torch takes this input: same result, warnings, or the very same exception


class Case(NamedTuple):
    id: str
    build: Callable
    expect: Raises | str
    marks: tuple = ()


OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW")
TORCH_WARNS_OF_DUPLICATES = pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")

CASES = [
    # -- hyperparameters and param lists (test_optim_bad_input.py has negative lr, eps, betas...)
    # torch warns that a param listed twice will be an error (the warning is compared here), and
    # its for-loop updates it once per listing: fusedtrain steps such a group by that loop
    *[Case(f"{name}-param-listed-twice-in-a-group",
           optimizer_construction(name, lambda: [make_params(torch.float32, seed=13, shapes=[(3,)]) * 2], lr=0.1),
           TORCH)
      for name in OPTIMIZER_NAMES],
    *[Case(f"{name}-steps-of-a-param-listed-twice",
           optimizer_steps(name, two_groups(lambda: grads_set(make_params(torch.float32, seed=13, shapes=[(3,), (2,)]))[::-1] * 2)),
           TORCH, marks=(TORCH_WARNS_OF_DUPLICATES,))
      for name in OPTIMIZER_NAMES],
    Case("Adam-add_param_group-listing-a-param-twice",
         optimizer_call("Adam", lambda opt, params: opt.add_param_group({"params": [params[0].new_ones(2)] * 2})),
         TORCH),
    Case("SGD-param-in-two-groups",
         optimizer_construction("SGD", lambda: [make_params(torch.float32, seed=14, shapes=[(3,)])] * 2, lr=0.1),
         Raises(ValueError, "some parameters appear in more than one parameter group")),
    Case("Adam-add_param_group-with-a-param-it-has",
         optimizer_call("Adam", lambda opt, params: opt.add_param_group({"params": [params[1]]})),
         Raises(ValueError, "some parameters appear in more than one parameter group")),
    Case("Adam-non-leaf-param",
         optimizer_construction("Adam", lambda: [[make_params(torch.float32, seed=15, shapes=[(3,)])[0] * 2]]),
         Raises(ValueError, "can't optimize a non-leaf Tensor")),
    Case("SGD-empty-param-list", optimizer_construction("SGD", lambda: [], lr=0.1),
         Raises(ValueError, "empty parameter list")),
    # torch.optim.SGD checks lr < 0, so it takes nan and trains to nan; Adam refuses nan, and so
    # does every fusedtrain optimizer
    Case("SGD-nan-lr", optimizer_construction("SGD", lambda: [make_params(torch.float32, seed=16, shapes=[(3,)])],
                                              lr=float("nan")),
         Raises(ValueError, "Invalid learning rate: nan", torch_raises_too=False)),
    Case("Adam-2-element-tensor-beta",
         optimizer_construction("Adam", lambda: [make_params(torch.float32, seed=17, shapes=[(3,)])],
                                betas=(torch.tensor([0.9, 0.8]), 0.999)),
         Raises(ValueError, r"Tensor betas\[0\] must be 1-element", torch_raises_too=False)),
    *[Case(f"{name}-{key}-changed-by-hand-after-construction",
           optimizer_steps(name, special_params("nan and inf grads"), setup=set_group_value(key, value)), TORCH)
      for name, key, value in (("SGD", "lr", -0.05), ("Adam", "lr", -0.05), ("AdamW", "lr", 0.0),
                               ("SGD", "nesterov", True), ("Adam", "maximize", True))],
    # -- grads that do not fit their param, in a later group: nothing of group 0 may move
    *[Case(f"{name}-grad-of-another-shape",
           optimizer_steps(name, two_groups(lambda: [param_with_grad((5,), grad_shape=(4, 3))])),
           Raises(RuntimeError, r"param 0 of param group 1 has shape \(5,\) but its grad has shape \(4, 3\)"))
      for name in OPTIMIZER_NAMES],
    Case("Adam-float64-grad-of-a-float32-param",
         optimizer_steps("Adam", two_groups(lambda: [param_with_grad((3,), grad_dtype=torch.float64)])),
         Raises(RuntimeError, "param 0 of param group 1 is torch.float32 on cpu but its grad is torch.float64")),
    # torch.optim.SGD adds the float32 grad into the float64 param; the kernels take one dtype
    Case("SGD-float32-grad-of-a-float64-param",
         optimizer_steps("SGD", two_groups(lambda: [param_with_grad((3,), dtype=torch.float64)])),
         Raises(RuntimeError, "param 0 of param group 1 is torch.float64 on cpu but its grad is torch.float32",
                torch_raises_too=False)),
    # torch.optim steps complex params as pairs of reals, and so do the kernels
    *[Case(f"{name}-complex-param", optimizer_steps(name, two_groups(lambda: [complex_param()])), TORCH)
      for name in OPTIMIZER_NAMES],
    Case("Adam-fused-complex-param", optimizer_steps("Adam", two_groups(lambda: [complex_param()]), fused=True),
         Raises(RuntimeError, r"`fused=True` requires all the params to be floating point Tensors.*"
                              r"torch.complex64 and cpu \(Adam: param 0 of param group 1\)")),
    Case("SGD-integer-param", optimizer_steps("SGD", two_groups(lambda: [int_param()])),
         Raises(RuntimeError, "param 0 of param group 1 has dtype torch.int64")),
    Case("AdamW-sparse-grad", optimizer_steps("AdamW", two_groups(lambda: [sparse_grad_param()])),
         Raises(RuntimeError, "AdamW does not support sparse gradients")),
    # torch.optim.SGD adds a sparse gradient (and keeps a sparse momentum buffer) in its for-loop,
    # which steps such a group in fusedtrain too; weight decay makes torch's loop fail halfway
    *[Case(f"SGD-sparse-grad-{label}", optimizer_steps("SGD", two_groups(lambda: [sparse_grad_param()]), **kwargs), TORCH)
      for label, kwargs in (("without-momentum", {"momentum": 0, "weight_decay": 0}),
                            ("with-momentum", {"weight_decay": 0}),
                            ("with-nesterov-and-maximize", {"weight_decay": 0, "nesterov": True, "maximize": True}))],
    Case("SGD-sparse-grad-with-weight-decay", optimizer_steps("SGD", two_groups(lambda: [sparse_grad_param()])),
         Raises(RuntimeError, r"add\(sparse, dense\) is not supported.*param 0 of param group 1 has a sparse gradient")),
    Case("SGD-fused-sparse-grad", optimizer_steps("SGD", two_groups(lambda: [sparse_grad_param()]), weight_decay=0, fused=True),
         Raises(RuntimeError, "`_fused_sgd` does not support sparse gradients")),
    # differentiable=True: torch's for-loop, recording autograd history; on leaf params that require
    # grad both fail the same way (an in-place update of a leaf under autograd)
    *[Case(f"{name}-differentiable-on-leaf-params", optimizer_steps(name, two_groups(lambda: grads_set(make_params(torch.float32, seed=24, shapes=[(3,)]))), differentiable=True), TORCH)
      for name in OPTIMIZER_NAMES],
    Case("Adam-grad-on-another-device",
         optimizer_steps("Adam", two_groups(lambda: [cuda_param_with_cpu_grad()])),
         Raises(RuntimeError, "param 0 of param group 1 is torch.float32 on cuda:0 but its grad is torch.float32 on cpu")),
    # -- optimizer state that does not fit, loaded through load_state_dict
    Case("AdamW-max_exp_avg_sq-of-another-size",
         optimizer_steps("AdamW", two_groups(lambda: grads_set(make_params(torch.float32, seed=18, shapes=[(3,)]))),
                         setup=load_modified_state(replace_state(2, "max_exp_avg_sq", torch.zeros(7)))),
         Raises(RuntimeError, r"state\['max_exp_avg_sq'\] of param 0 of param group 1 has shape \(7,\)")),
    Case("Adam-state-without-step",
         optimizer_steps("Adam", two_groups(lambda: grads_set(make_params(torch.float32, seed=19, shapes=[(3,)]))),
                         setup=load_modified_state(drop_state(1, "step"))),
         # torch.optim.Adam's load_state_dict fails with KeyError('step')
         Raises(RuntimeError, r"state\['step'\] of param 1 of param group 0 must be a one-element", torch_raises_too=False)),
    Case("Adam-step-of-two-elements",
         optimizer_steps("Adam", two_groups(lambda: grads_set(make_params(torch.float32, seed=20, shapes=[(3,)]))),
                         setup=load_modified_state(replace_state(2, "step", torch.tensor([2.0, 2.0])))),
         Raises(RuntimeError, r"state\['step'\] of param 0 of param group 1 must be a one-element")),
    Case("Adam-int-step-of-an-old-checkpoint",
         optimizer_steps("Adam", two_groups(lambda: grads_set(make_params(torch.float32, seed=21, shapes=[(3,)]))),
                         setup=load_modified_state(replace_state(2, "step", 2))),
         TORCH),
    Case("SGD-state_dict-with-fewer-groups",
         optimizer_call("SGD", lambda opt, params: opt.load_state_dict(
             {"state": {}, "param_groups": opt.state_dict()["param_groups"][:1]})),
         Raises(ValueError, "different number of parameter groups")),
    Case("Adam-state_dict-of-a-group-of-another-size",
         optimizer_call("Adam", lambda opt, params: opt.load_state_dict(
             {"state": {}, "param_groups": [g | {"params": g["params"][:1]} for g in opt.state_dict()["param_groups"]]})),
         Raises(ValueError, "doesn't match the size of optimizer's group")),
    # -- inputs torch.optim takes: the same result
    *[Case(f"{name}-{kind.replace(' ', '-')}", optimizer_steps(name, special_params(kind)), TORCH)
      for name in OPTIMIZER_NAMES
      for kind in ("non-contiguous grads", "non-contiguous params", "empty and 0-dim params",
                   "nan and inf grads", "nan and inf params")],
    Case("SGD-params-on-cpu-and-meta", optimizer_steps("SGD", special_params("params on cpu and meta")), TORCH),
    # torch's fused=True refuses a meta param (its fused kernels run on real devices)
    Case("Adam-fused-params-on-cpu-and-meta", optimizer_steps("Adam", special_params("params on cpu and meta"), fused=True),
         Raises(RuntimeError, r"`fused=True` requires all the params to be floating point Tensors of supported "
                              r"devices: .* but torch.float32 and meta \(Adam: param 1 of param group 0\)")),
    *[Case(f"{name}-params-on-cpu-and-meta", optimizer_steps(name, special_params("params on cpu and meta")), TORCH)
      for name in ("Adam", "AdamW")],

    # -- linear_mse_loss
    Case("loss-weight-of-another-in-features", loss_call(linear_inputs(weight=torch.randn(2, 4))),
         Raises(RuntimeError, r"weight must have shape \(out, 3\) for x of shape \(5, 3\), got \(2, 4\)")),
    Case("loss-bias-of-another-length", loss_call(linear_inputs(bias=torch.randn(3))),
         Raises(RuntimeError, r"bias must have shape \(2,\)")),
    Case("loss-float64-weight", loss_call(linear_inputs(weight=lambda w: w.double())),
         Raises(RuntimeError, "weight is torch.float64 on cpu but x is torch.float32")),
    Case("loss-float64-bias", loss_call(linear_inputs(bias=lambda b: b.double())),
         Raises(RuntimeError, "bias is torch.float64 on cpu but x is torch.float32")),
    Case("loss-target-on-meta", loss_call(linear_inputs(target=lambda y: y.to("meta"))),
         Raises(RuntimeError, "target is torch.float32 on meta but x is torch.float32 on cpu")),
    # torch multiplies a CPU x with a meta weight and returns a number
    Case("loss-weight-on-meta", loss_call(linear_inputs(weight=lambda w: w.to("meta"), grad=False)),
         Raises(RuntimeError, "weight is torch.float32 on meta but x is torch.float32 on cpu", torch_raises_too=False)),
    Case("loss-target-that-does-not-broadcast", loss_call(linear_inputs(target=torch.randn(5, 3))),
         Raises(RuntimeError, r"target of shape \(5, 3\) does not broadcast"),
         marks=(pytest.mark.filterwarnings("ignore:Using a target size"),)),  # torch's, before its error
    Case("loss-unknown-reduction", loss_call(linear_inputs(), reduction="avg"),
         Raises(ValueError, "avg is not a valid value for reduction")),
    *[Case(f"loss-{label}", loss_call(linear_inputs(**changes), **kwargs), TORCH)
      for label, changes, kwargs in (
          ("0-dim-x", {"x": torch.tensor(1.0)}, {}),
          ("1-d-x", {"x": torch.randn(3), "target": torch.randn(2)}, {}),
          ("3-d-x", {"x": torch.randn(2, 5, 3), "target": torch.randn(2, 5, 2)}, {}),
          ("1-d-weight", {"weight": torch.randn(3), "bias": torch.tensor(0.5), "target": torch.randn(5)}, {}),
          ("2-d-bias", {"bias": lambda b: b.detach().reshape(1, 2)}, {}),
          ("no-bias", {"bias": None}, {}),
          ("target-broadcast-over-rows", {"target": torch.randn(2)}, {}),
          ("target-broadcasting-the-prediction", {"target": torch.randn(4, 5, 2)}, {}),
          ("float64-target", {"target": lambda y: y.double()}, {}),
          ("target-needing-a-gradient", {"target": lambda y: y.requires_grad_()}, {}),
          ("integer-inputs", {k: (lambda t: t.long()) for k in ("x", "weight", "bias", "target")} | {}, {}),
          ("sparse-x", {"x": lambda x: x.to_sparse()}, {}),
          ("empty-batch", {"x": torch.randn(0, 3), "target": torch.randn(0, 2)}, {}),
          ("empty-batch-bfloat16", {"x": torch.randn(0, 3, dtype=torch.bfloat16), "target": torch.randn(0, 2, dtype=torch.bfloat16),
                                    "weight": lambda w: w.bfloat16(), "bias": lambda b: b.bfloat16()}, {}),
          ("no-in-features", {"x": torch.randn(5, 0), "weight": torch.randn(2, 0)}, {}),
          ("no-out-features", {"weight": torch.randn(0, 3), "bias": torch.randn(0), "target": torch.randn(5, 0)}, {}),
          ("non-contiguous-x-and-weight", {"x": lambda x: x.t().contiguous().t(), "weight": lambda w: w.t().contiguous().t()}, {}),
          ("nan-x", {"x": fill((1, 2), float("nan"))}, {}),
          ("inf-target", {"target": fill((0, 1), float("inf"))}, {}),
          ("reduction-none", {}, {"reduction": "none"}),
          ("reduction-sum-without-autograd", {}, {"reduction": "sum", "backward": False}),
      )],

    # -- FusedTrainStep (test_train.py has the wrong feature count, dtype, model and optimizer)
    Case("step-x-on-meta", step_call(step_data(x=lambda x: x.to("meta"))),
         Raises(TypeError, "x is torch.float32 on meta but the model is torch.float32 on cpu", torch_raises_too=False)),
    Case("step-y-on-meta", step_call(step_data(y=lambda y: y.to("meta"))),
         Raises(TypeError, "y is on meta but the model is on cpu", torch_raises_too=False)),
    Case("step-integer-x", step_call(step_data(x=lambda x: x.long())),
         Raises(TypeError, "x is torch.int64 on cpu but the model is torch.float32", torch_raises_too=False)),
    # the fused step takes (N, in) batches: documented, and refused with the shape named
    Case("step-1-d-x", step_call(step_data(x=torch.randn(3), y=torch.randn(2))),
         Raises(ValueError, r"x must have shape \(N, 3\) \(a stack takes a batch of rows, 2-D\), got \(3,\)", torch_raises_too=False)),
    Case("step-3-d-x", step_call(step_data(x=torch.randn(2, 4, 3), y=torch.randn(2, 4, 2))),
         Raises(ValueError, r"x must have shape \(N, 3\) \(a stack takes a batch of rows, 2-D\), got \(2, 4, 3\)", torch_raises_too=False)),
    Case("step-float16-model", step_call(step_data(dtype=torch.float16), dtype=torch.float16),
         Raises(TypeError, "is torch.float16; a stack is float32 or float64", torch_raises_too=False)),
    Case("step-sparse-x", step_call(step_data(x=lambda x: x.to_sparse())), TORCH),
    Case("step-empty-batch", step_call(step_data(n=0)), TORCH),
    *[Case(f"step-{label}", step_call(step_data(**changes), optimizer=optimizer), TORCH)
      for label, changes, optimizer in (
          ("non-contiguous-x", {"x": lambda x: x.t().contiguous().t()}, "AdamW"),
          ("nan-x", {"x": fill((2, 1), float("nan"))}, "SGD"),
          ("inf-y", {"y": fill((0, 0), float("inf"))}, "Adam"),
          ("y-broadcast-over-rows", {"y": torch.randn(2)}, "SGD"),
          ("y-of-one-column", {"y": torch.randn(6, 1)}, "Adam"),
      )],
]


def cloned(seen: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in seen.items()}


def assert_same(got: dict, want: dict, **tolerance) -> None:
    """Bit-identical by default (nan equal to nan); meta tensors by shape and dtype."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if not isinstance(w, torch.Tensor):
            assert g == w, key
        elif w.device.type == "meta":
            assert (g.device, g.shape, g.dtype) == (w.device, w.shape, w.dtype), key
        else:
            if w.is_sparse:
                g, w = g.to_dense(), w.to_dense()
            torch.testing.assert_close(g, w, equal_nan=True, check_stride=False,
                                       **(tolerance or {"rtol": 0, "atol": 0}), msg=lambda m: f"{key}: {m}")


def run(side, build):
    """The outcome of a case on one side: what it watches afterwards, the warnings, the error."""
    scenario = build(side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scenario.action()
            error = None
        except Exception as e:  # noqa: BLE001 - compared with torch's below
            error = e
    return scenario.watch(), [str(w.message) for w in caught], error


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case):
    if isinstance(case.expect, Raises):
        scenario = case.build(FusedSide)
        before = cloned(scenario.watch())
        with pytest.raises(case.expect.error, match=case.expect.match):
            scenario.action()
        assert_same(scenario.watch(), before)
        if case.expect.torch_raises_too:
            with pytest.raises(case.expect.error):
                case.build(TorchSide).action()
        return
    got, got_warnings, got_error = run(FusedSide, case.build)
    want, want_warnings, want_error = run(TorchSide, case.build)
    assert type(got_error) is type(want_error) and str(got_error) == str(want_error)
    assert got_warnings == want_warnings
    assert_same(got, want, rtol=1e-5, atol=1e-6)


def test_every_case_has_its_own_id():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# ---- more than 2^31 elements: 64-bit indexing ----

HUGE_ELEMENTS = 2**31 + 64
HUGE_BYTES_NEEDED = 2 * 2 * HUGE_ELEMENTS + (2 << 30)  # bfloat16 param and grad, and a margin

HUGE_SGD_STEP = f"""
import json, resource, time
import torch
import fusedtrain.optim
import fusedtrain.reference

n = {HUGE_ELEMENTS}
# the first elements, those around 2^31, the last: an index that wrapped at 32 bits would update
# an early element twice, or a late one never
picks = torch.cat([torch.arange(8), torch.arange(2**31 - 4, 2**31 + 4), torch.arange(n - 8, n)])
g = torch.Generator().manual_seed(0)
start = time.perf_counter()
param = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16))  # the rest: whatever memory holds
grad = torch.empty(n, dtype=torch.bfloat16)
with torch.no_grad():
    param[picks] = torch.randn(len(picks), generator=g).bfloat16()
grad[picks] = torch.randn(len(picks), generator=g).bfloat16()
param.grad = grad
# fp32 math rounded once to bfloat16, as the kernels do (torch's for-loop rounds lr * grad first)
small = param.detach()[picks].clone()
fusedtrain.reference.sgd_step_([small], [grad[picks].clone()], [], 0.3, 0.0, 0.0, 0.0, False, False, False)
fusedtrain.optim.SGD([param], lr=0.3).step()
seconds = time.perf_counter() - start
got = param.detach()[picks]
print(json.dumps({{"got": got.float().tolist(), "want": small.float().tolist(),
                  "seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def test_sgd_step_on_more_than_2_31_elements():
    """SGD without momentum on a bfloat16 param of 2^31 + 64 elements (8 GiB with its grad),
    in a child process so that a crash fails the test instead of the run."""
    available = available_memory_bytes()
    if available < HUGE_BYTES_NEEDED:
        pytest.skip(f"needs {HUGE_BYTES_NEEDED / 2**30:.1f} GiB of available memory, "
                    f"/proc/meminfo has {available / 2**30:.1f} GiB")
    result = run_python(HUGE_SGD_STEP, timeout=300)
    print(f"{result['seconds']:.1f} s, peak resident set {result['peak_rss_gib']:.1f} GiB")  # shown with -s
    torch.testing.assert_close(torch.tensor(result["got"]), torch.tensor(result["want"]), rtol=0, atol=0)
