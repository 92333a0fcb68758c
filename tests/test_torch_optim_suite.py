"""torch's own optimizer tests, rewritten for fusedtrain.optim.SGD, Adam and AdamW on the CPU.

torch checks its optimizers in TestOptimRenewed (test/test_optim.py) and TestDifferentiableOptimizer
(test/optim/test_optim.py) over the configurations of its OptimizerInfo database, optim_db. The
test files are not in the wheel, but the database is (torch.testing._internal.common_optimizers):
here every configuration it lists for these three optimizers, with the foreach/fused/differentiable
variants torch adds, goes through the behaviours those tests check, with fusedtrain's classes in
place of torch's. Where torch only checks that a loss moved the right way, fusedtrain is also held
to the stock optimizer, step for step.

common_optimizers is imported by the first test that runs here: the import takes seconds, and it
switches torch's global backend flags off for the rest of the process.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle
import re
import warnings
from typing import Any, NamedTuple

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fusedtrain.optim

NAMES = ("SGD", "Adam", "AdamW")


class Subject(NamedTuple):
    """An optimizer under test: torch's OptimizerInfo for it, with fusedtrain's class put in."""

    info: Any
    torch_cls: type
    db: Any  # the common_optimizers module

    @property
    def cls(self) -> type:
        return self.info.optim_cls

    def configs(self, dtype=torch.float32, skip=()):
        """Every configuration torch tests, with each implementation flag torch supports on the
        CPU set in turn (foreach, fused, differentiable), as fresh keyword dictionaries."""
        inputs = self.db._get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, self.info, skip=skip)
        return [copy.deepcopy(i.kwargs) for i in inputs]

    def plain_configs(self):
        """The configurations without implementation flags."""
        return [copy.deepcopy(i.kwargs) for i in self.info.optim_inputs_func(device="cpu")]


@pytest.fixture(scope="module")
def common_optimizers():
    from torch.testing._internal import common_optimizers
    return common_optimizers


@pytest.fixture(params=NAMES)
def subject(request, common_optimizers) -> Subject:
    info = next(i for i in common_optimizers.optim_db if i.optim_cls.__name__ == request.param)
    ours = copy.copy(info)
    ours.optim_cls = getattr(fusedtrain.optim, request.param)
    return Subject(ours, info.optim_cls, common_optimizers)


def forloop(kwargs: dict) -> dict:
    """`kwargs` for torch's for-loop implementation, the one torch's tests hold the others to (its
    fused CPU kernels also update non-contiguous params wrongly in torch 2.13)."""
    return {k: v for k, v in copy.deepcopy(kwargs).items() if k not in ("foreach", "fused")} | {"foreach": False}


def assert_same(ours, theirs, **tolerance):
    """Params (lists) or optimizer states (dicts of tensors) agree, fusedtrain against torch."""
    torch.testing.assert_close(ours, theirs, equal_nan=True, **tolerance)


def assert_same_state(opt, params, torch_opt, torch_params):
    assert_same([p.detach() for p in params], [p.detach() for p in torch_params])
    for p, q in zip(params, torch_params):
        state, torch_state = opt.state.get(p, {}), torch_opt.state.get(q, {})
        assert state.keys() == torch_state.keys()
        for key in state:
            assert_same(state[key].detach(), torch_state[key].detach(), msg=lambda m, key=key: f"{key}: {m}")


def assert_same_state_dict(ours, theirs):
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in ours["state"].items():
        assert state.keys() == theirs["state"][index].keys()
        for key, value in state.items():
            assert_same(value, theirs["state"][index][key])


def linear_problem(dtype=torch.float32, contiguous=True, seed=0):
    """(weight, bias, input) of torch's standard problem: loss = |weight @ input + bias|^2."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        weight, bias = torch.randn(10, 5, generator=g, dtype=dtype), torch.randn(10, generator=g, dtype=dtype)
    else:  # every other element of a larger tensor
        weight = torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0]
        bias = torch.randn(10, 2, generator=g, dtype=dtype)[..., 0]
    return Parameter(weight), Parameter(bias), torch.randn(5, generator=g, dtype=dtype)


def linear_loss(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


# ---- the update: every configuration, against torch ----

@pytest.mark.parametrize("contiguous", [True, False])
def test_every_config_steps_as_torch_does(subject, contiguous):
    """Seven steps of every configuration on a weight, a bias, a 0-dim and an empty param, with a
    step where no param has a gradient and two where one has none (a frozen layer): the params and
    every state tensor as torch's for-loop's after each step."""
    for kwargs in subject.configs():
        sides = []
        for cls, cls_kwargs in ((subject.cls, copy.deepcopy(kwargs)), (subject.torch_cls, forloop(kwargs))):
            weight, bias, _ = linear_problem(contiguous=contiguous)
            params = [weight, bias, Parameter(torch.tensor(0.5)), Parameter(torch.empty(0))]
            if kwargs.get("differentiable"):  # torch's differentiable step cannot update a leaf in place
                params = [p.detach() for p in params]
            sides.append((cls(params, **cls_kwargs), params))
        g = torch.Generator().manual_seed(1)
        for step in range(7):
            grads = [torch.randn(p.shape, generator=g) for p in sides[0][1]]
            for opt, params in sides:
                for i, (p, grad) in enumerate(zip(params, grads)):
                    p.grad = None if step == 2 or (step in (3, 4) and i == 0) else grad.clone()
                opt.step()
            assert_same_state(*sides[0], *sides[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_configs_in_other_dtypes_step_as_torch_does(subject, dtype):
    """torch's fused-against-for-loop check in float64 and the 16-bit dtypes (its configurations
    for the dtype: a larger eps for float16 Adam), on a small sigmoid network whose middle layer
    is frozen for two steps, with a 0-dim param and a step without gradients. In 16 bits the
    kernels do their math in float32 and round once, as torch's fused kernels do, where its
    for-loop rounds every intermediate: there fusedtrain is held to torch's fused=True (on these
    contiguous params), to the tolerance torch allows its fused kernels against its for-loop."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    tolerance = {"atol": 5e-3, "rtol": 5e-3} if low_precision else {}
    for kwargs in [i.kwargs for i in subject.info.optim_inputs_func(device="cpu", dtype=dtype)]:
        reference = {**copy.deepcopy(kwargs), "fused": True} if low_precision else forloop(kwargs)
        sides = []
        for cls, cls_kwargs in ((subject.cls, copy.deepcopy(kwargs)), (subject.torch_cls, reference)):
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                        torch.nn.Sigmoid()).to(dtype)
            scalar = torch.zeros((), dtype=dtype, requires_grad=True)
            scalar.grad = torch.rand_like(scalar)
            params = [*model.parameters(), scalar]
            sides.append((model, cls(params, **cls_kwargs), params))
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        for i in range(7):
            for model, opt, _ in sides:
                opt.zero_grad()
                model[2].requires_grad_(i not in (3, 4))
                if i != 2:
                    model(x).sum().backward()
                opt.step()
            (_, opt, params), (_, torch_opt, torch_params) = sides
            assert_same([p.detach() for p in params], [p.detach() for p in torch_params], **tolerance)
            for p, q in zip(params, torch_params):
                for key, value in opt.state[p].items():
                    assert_same(value, torch_opt.state[q][key], **tolerance)


def test_training_with_schedulers_matches_torch(subject):
    """torch's 'goes the right direction' test with each of its LR scheduler sets: 20 steps on the
    linear problem lower the loss (raise it under maximize), exactly as torch's optimizer does."""
    for schedulers in [[]] + list(subject.info.scheduler_inputs):
        for kwargs in subject.plain_configs():
            results = []
            for cls in (subject.cls, subject.torch_cls):
                weight, bias, x = linear_problem()
                opt = cls([weight, bias], **copy.deepcopy(kwargs))
                attached = [make(opt) for make in schedulers]
                initial = linear_loss(weight, bias, x).item()
                for _ in range(20):
                    opt.zero_grad()
                    loss = linear_loss(weight, bias, x)
                    loss.backward()
                    opt.step()
                    for scheduler in attached:
                        scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
                final = linear_loss(weight, bias, x).item()
                assert (final > initial) if kwargs.get("maximize") else (final < initial), kwargs
                results.append([weight.detach(), bias.detach()])
            assert_same(*results)


def test_param_groups_take_their_own_lr_and_weight_decay(subject):
    """A group with the configuration beside one with lr 1e-28 (which must not move) and one
    without weight decay, as in torch's param-group tests; same result as torch's optimizer."""
    for kwargs in subject.configs(skip=("differentiable",)):
        if kwargs.get("lr", 0) == 0:
            kwargs["lr"] = 1e-3
        results = []
        for cls, kwargs in ((subject.cls, kwargs), (subject.torch_cls, forloop(kwargs))):
            weight, bias, x = linear_problem()
            weight2 = Parameter(weight.detach() * 0.5)
            frozen = Parameter(torch.randn(2, 2, generator=torch.Generator().manual_seed(2)))
            frozen_before = frozen.detach().clone()
            opt = cls([dict(params=[weight, bias], **copy.deepcopy(kwargs)),
                       dict(params=[weight2], **{**copy.deepcopy(kwargs), "weight_decay": 0.0}),
                       dict(params=[frozen])], lr=1e-28)
            g = torch.Generator().manual_seed(3)
            for _ in range(10):
                opt.zero_grad()
                (linear_loss(weight, bias, x) + weight2.mv(x).pow(2).sum()).backward()
                frozen.grad = torch.rand(2, 2, generator=g)
                opt.step()
            assert_same(frozen.detach(), frozen_before)
            results.append([weight.detach(), bias.detach(), weight2.detach()])
        assert_same(*results)


@pytest.mark.parametrize("num_dim", [0, 1, 2])
def test_tensor_lr_steps_as_float_lr(subject, num_dim):
    for kwargs in subject.configs(skip=("differentiable",)):
        results = []
        for lr in (1e-3, torch.tensor(1e-3).reshape([1] * num_dim)):
            kwargs["lr"] = lr
            weight, bias, x = linear_problem()
            try:
                opt = subject.cls([weight, bias], **kwargs)
            except ValueError as e:  # torch refuses a tensor lr with foreach=True (see test_errors)
                assert "lr as a Tensor is not supported" in str(e) and kwargs.get("foreach")
                break
            for _ in range(5):
                opt.zero_grad()
                linear_loss(weight, bias, x).backward()
                opt.step()
            results.append([weight.detach(), bias.detach()])
        else:
            assert_same(*results)


# ---- steps that must change nothing ----

def test_step_without_grads_or_with_zero_grads_changes_nothing(subject):
    """No gradient at all (closure only), and zero gradients without weight decay (AdamW with a
    tiny lr, as its decay moves params even then): every configuration, differentiable included."""
    for kwargs in subject.configs():
        opt = subject.cls([torch.randn(2, 3) for _ in range(2)], **copy.deepcopy(kwargs))
        assert opt.step(lambda: torch.tensor([1.0])) == torch.tensor([1.0])
        if kwargs.get("weight_decay", 0) != 0:
            continue
        if subject.cls.__name__ == "AdamW":
            kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr"), torch.Tensor) else 1e-5
        param = torch.randn(5, 1, requires_grad=True)
        before = param.detach().clone()
        params = [param.detach()] if kwargs.get("differentiable") else [param]
        opt = subject.cls(params, **kwargs)
        params[0].grad = torch.zeros_like(params[0])
        opt.step()
        assert_same(params[0].detach(), before)


def test_grads_are_never_written_in_place(subject):
    for kwargs in subject.configs():
        param = torch.randn(5, 1, requires_grad=True)
        params = [param.detach()] if kwargs.get("differentiable") else [param]
        opt = subject.cls(params, **kwargs)
        params[0].grad = torch.rand_like(params[0])
        version = params[0].grad._version
        for _ in range(5):
            opt.step()
            assert params[0].grad._version == version


# ---- state_dict ----

def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("named", [(False, False), (True, False), (False, True), (True, True)])
def test_state_dict_round_trip_is_deterministic(subject, named):
    """A state_dict loaded into a fresh optimizer on equal (not identical) params continues the
    same steps, and the two state_dicts stay equal; with and without param names."""
    for kwargs in subject.configs(skip=("differentiable",)):
        weight, bias, x = linear_problem()
        opt = subject.cls(_named([weight, bias], named[0]), **copy.deepcopy(kwargs))

        def step(o, w, b):
            o.zero_grad()
            linear_loss(w, b, x).backward()
            o.step()

        for _ in range(5):
            step(opt, weight, bias)
        weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        opt_c = subject.cls(_named([weight_c, bias_c], named[1]), **copy.deepcopy(kwargs))
        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(5):
            step(opt, weight, bias)
            step(opt_c, weight_c, bias_c)
            assert_same([weight, bias], [weight_c, bias_c])
        assert_same_state_dict(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
        opt_c.param_groups.extend(opt_c.param_groups)  # a repeated group is written out the same
        assert (_without_param_names(opt.state_dict())["param_groups"][-1]
                == _without_param_names(opt_c.state_dict())["param_groups"][-1])
        if named[0] or named[1]:
            assert opt_c.state_dict()["param_groups"][0]["param_names"] == ["name0", "name1"]


def test_state_dict_moves_between_torch_and_fusedtrain(subject):
    """torch's optimizer state loads into fusedtrain's and the other way round, and training
    continues as if it had not moved."""
    for kwargs in subject.configs(skip=("differentiable",)):
        for first, second in ((subject.torch_cls, subject.cls), (subject.cls, subject.torch_cls)):
            runs = []
            for switch in (False, True):
                weight, bias, x = linear_problem()
                opt = first([weight, bias], **copy.deepcopy(kwargs))
                for i in range(6):
                    if switch and i == 3:
                        moved = second([weight, bias], **copy.deepcopy(kwargs))
                        moved.load_state_dict(copy.deepcopy(opt.state_dict()))
                        opt = moved
                    opt.zero_grad()
                    linear_loss(weight, bias, x).backward()
                    opt.step()
                runs.append([weight.detach(), bias.detach()])
            assert_same(*runs)


def test_older_state_dicts_load(subject):
    """A state_dict without the flags torch added after the optimizer's first release, and one
    whose 'step' is a number (torch < 1.12), load and step."""
    for kwargs in subject.configs(skip=("differentiable",)):
        weight, bias, x = linear_problem()
        opt = subject.cls([weight, bias], **kwargs)

        def step():
            opt.zero_grad()
            linear_loss(weight, bias, x).backward()
            opt.step()

        for _ in range(3):
            step()
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in subject.info.not_og_supported_flags:
                group.pop(flag, None)
        opt.load_state_dict(old)
        step()
        old = copy.deepcopy(opt.state_dict())
        for state in old["state"].values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].item()
        opt.load_state_dict(old)
        step()


@pytest.mark.parametrize("named", [False, True])
def test_state_dict_saves_and_loads_with_weights_only(subject, named):
    for kwargs in subject.configs(skip=("differentiable",)):
        weight, bias, x = linear_problem()
        opt = subject.cls(_named([weight, bias], named), **kwargs)
        for _ in range(3):
            opt.zero_grad()
            linear_loss(weight, bias, x).backward()
            opt.step()
        saved = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            assert_same_state_dict(torch.load(buffer, weights_only=weights_only), saved)


def test_state_is_created_for_every_param_with_a_grad(subject):
    for kwargs in subject.plain_configs():
        model = torch.nn.Linear(5, 5, bias=False)
        opt = subject.cls(model.parameters(), **kwargs)
        model(torch.rand(2, 5)).sum().backward()
        opt.step()
        assert all(len(state) > 0 for state in opt.state.values())


# ---- hooks, printing, copying ----

def _state_dict_pre_hook(opt):
    opt.state["test"] = 1


def _state_dict_post_hook(opt, state_dict):
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) is not None
    return state_dict


def _load_pre_hook_lr_002(opt, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook_lr_003(opt, state_dict):
    replaced = copy.deepcopy(state_dict)  # a hook may return a new state_dict to load instead
    replaced["param_groups"][0]["lr"] = 0.003
    return replaced


def _load_post_hook(opt):
    opt.state["ran_load_pre_hook_lr_003"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_post_hook"] = True


def test_state_dict_and_load_state_dict_hooks_run(subject):
    for kwargs in subject.configs():
        def fresh():
            return subject.cls([torch.rand(2, 3, requires_grad=True)], **copy.deepcopy(kwargs))

        opt = fresh()
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1
        opt = fresh()
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        saved = opt.state_dict()
        assert "test" not in saved["state"] and saved["ran_state_dict_pre_hook"] is True

        opt = fresh()
        saved = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook_lr_002)
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_pre_hook_lr_003, prepend=True)  # runs first
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["lr"] == 0.002
        opt = fresh()
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_post_hook"] and not opt.state["ran_load_pre_hook_lr_003"]
        opt = fresh()
        opt.register_load_state_dict_pre_hook(_load_pre_hook_lr_003)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_post_hook"] and opt.state["ran_load_pre_hook_lr_003"]


def test_step_hooks_run_in_order_and_go_away(subject):
    """Global pre, local pre, local post, global post, around each step of every configuration
    (a torch SGD beside it shares the global hooks); removed hooks no longer run."""
    for kwargs in subject.configs():
        params = [torch.tensor([[1.0, 1.0]])]
        opt, torch_sgd = subject.cls(params, **kwargs), torch.optim.SGD(params)
        calls = []
        handles = [register_optimizer_step_pre_hook(lambda *_: calls.append("global pre")),
                   register_optimizer_step_post_hook(lambda *_: calls.append("global post"))]
        try:
            for o in (opt, torch_sgd):
                handles.append(o.register_step_pre_hook(lambda *_: calls.append("pre")))
                handles.append(o.register_step_post_hook(lambda *_: calls.append("post")))
            one_step = ["global pre", "pre", "post", "global post"]
            opt.step()
            torch_sgd.step()
            opt.step()
            assert calls == one_step * 3
        finally:
            for handle in handles:
                handle.remove()
        opt.step()
        torch_sgd.step()
        assert calls == one_step * 3


def test_printing_deepcopy_and_pickling(subject):
    for kwargs in subject.configs(skip=("differentiable",)):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        opt = subject.cls(params, **kwargs)
        assert repr(opt).startswith(subject.cls.__name__ + " (")
        for _ in range(3):
            opt.step()
        public = {k for k in opt.__dict__ if not k.startswith("_")}
        assert {k for k in copy.deepcopy(opt).__dict__ if not k.startswith("_")} == public
        restored = pickle.loads(pickle.dumps(opt))
        assert_same_state_dict(restored.state_dict(), opt.state_dict())
    for kwargs in subject.configs():  # differentiable ones print too
        repr(subject.cls([Parameter(torch.randn(2))], **kwargs))


# ---- errors ----

def test_errors_are_torchs(subject, common_optimizers):
    """Each bad input of torch's error database raises (or warns) as torch's test expects."""
    for case in subject.info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        given = case.optimizer_error_input
        construct = functools.partial(subject.cls, given.params, **given.kwargs)
        if case.error_on == common_optimizers.OptimizerErrorEnum.STEP_ERROR:
            action = construct().step
        else:
            action = construct
        if issubclass(case.error_type, Warning):
            with pytest.warns(case.error_type, match=case.error_regex):
                action()
        else:
            with pytest.raises(case.error_type, match=case.error_regex):
                action()


def test_fused_refuses_meta_params_as_torch_does(subject):
    """fused=True: torch's check of the params' device fails a step on meta params with its
    message; once the model is materialised on the CPU the same optimizer steps."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    opt = subject.cls(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


def test_param_listed_twice_warns_and_steps_as_torch(subject):
    """torch warns (and will refuse in future) a param listed twice in a group; its for-loop then
    updates it once per listing, in turn. fusedtrain warns with torch's text and does the same."""
    for kwargs in subject.configs(skip=("differentiable", "foreach", "fused")):
        sides = []
        for cls in (subject.cls, subject.torch_cls):
            weight, bias, x = linear_problem()
            with pytest.warns(UserWarning, match=re.escape(
                    "optimizer contains a parameter group with duplicate parameters; in future, this "
                    "will cause an error")):
                opt = cls([weight, bias, weight], **copy.deepcopy(kwargs))
            sides.append((opt, [weight, bias]))
        for _ in range(4):
            for opt, (weight, bias) in sides:
                opt.zero_grad()
                linear_loss(weight, bias, x).backward()
                opt.step()
        assert_same_state(*sides[0], *sides[1])


# ---- complex params ----

def test_complex_params_step_as_their_real_views(subject):
    """A complex param steps as torch steps it (as the real tensor of its (real, imaginary)
    pairs): against the same optimizer on those real tensors, and against torch, with a real
    param beside the complex ones; fused and differentiable skipped, as torch's test does."""
    for kwargs in subject.configs(dtype=torch.complex64, skip=("differentiable", "fused")):
        g = torch.Generator().manual_seed(4)
        complex_params = [torch.randn(10, 5, generator=g, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, generator=g, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, 5, generator=g, requires_grad=True)]
        real_params = [torch.view_as_real(p).detach().clone().requires_grad_() if p.is_complex()
                       else p.detach().clone().requires_grad_() for p in complex_params]
        torch_params = [p.detach().clone().requires_grad_() for p in complex_params]
        opt = subject.cls(complex_params, **copy.deepcopy(kwargs))
        real_opt = subject.cls(real_params, **copy.deepcopy(kwargs))
        torch_opt = subject.torch_cls(torch_params, **copy.deepcopy(kwargs))
        for _ in range(3):
            for p, r, t in zip(complex_params, real_params, torch_params):
                r.grad = torch.randn(r.shape, generator=g)
                p.grad = torch.view_as_complex(r.grad.clone()) if p.is_complex() else r.grad.clone()
                t.grad = p.grad.clone()
            for o in (opt, real_opt, torch_opt):
                o.step()
            as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
            assert_same(as_real, real_params, rtol=0, atol=0)
            assert_same_state(opt, complex_params, torch_opt, torch_params)
        assert all(v.is_complex() for v in opt.state[complex_params[0]].values() if v.dim() > 0)


def test_complex_param_steps_as_its_real_and_imaginary_parts(subject):
    """torch's complex 2-d check: one complex param of 2 elements on |rosenbrock|, against its real
    and imaginary parts as two real params."""
    for kwargs in subject.configs(dtype=torch.complex64, skip=("differentiable", "fused")):
        a = torch.randn(2, generator=torch.Generator().manual_seed(5), dtype=torch.complex64, requires_grad=True)
        real, imag = a.real.detach().clone().requires_grad_(), a.imag.detach().clone().requires_grad_()
        opt, opt_parts = subject.cls([a], **copy.deepcopy(kwargs)), subject.cls([real, imag], **copy.deepcopy(kwargs))
        for _ in range(3):
            opt.zero_grad()
            opt_parts.zero_grad()
            rosenbrock(a).abs().backward()
            rosenbrock(torch.complex(real, imag)).abs().backward()
            assert_same([a.grad.real, a.grad.imag], [real.grad, imag.grad])
            opt.step()
            opt_parts.step()
            assert_same([a.real, a.imag], [real, imag])


def rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def rosenbrock_grad(t):
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


# ---- sparse gradients (SGD) ----

@pytest.mark.parametrize("with_schedulers", [False, True])
def test_sparse_gradients_step_as_dense_ones_and_as_torch(subject, with_schedulers):
    """torch's sparse rosenbrock check, shortened (300 steps of cyclic coordinate descent, each
    gradient an uncoalesced sparse tensor holding one coordinate): the same path as with the
    dense gradient, and as torch's optimizer with the sparse one; towards the minimum."""
    if not subject.info.supports_sparse:
        pytest.skip(f"torch.optim.{subject.cls.__name__} does not take sparse gradients")
    kwarg_updates, scheduler_makers = subject.info.metadata_for_sparse
    seen = []
    for kwargs in subject.configs(dtype=torch.float64, skip=("differentiable", "fused")):
        for key in kwarg_updates:  # torch's tuned hyperparameters replace the configuration's
            kwargs.pop(key, None)
        if not kwargs or kwargs in seen:
            continue
        seen.append(copy.deepcopy(kwargs))
        kwargs.update(kwarg_updates)
        sides = []
        for cls, sparse in ((subject.cls, True), (subject.cls, False), (subject.torch_cls, True)):
            param = Parameter(torch.tensor([1.5, 1.5]))
            opt = cls([param], **copy.deepcopy(kwargs))
            sides.append((param, opt, sparse, [make(opt) for make in scheduler_makers] if with_schedulers else []))
        for i in range(300):
            coordinate = i % 2
            for param, opt, sparse, schedulers in sides:
                grad = rosenbrock_grad(param.detach())[1 - coordinate]
                if sparse:
                    index = torch.tensor([[1 - coordinate, 1 - coordinate]])
                    param.grad = torch.sparse_coo_tensor(index, torch.stack([grad / 4, grad - grad / 4]), (2,),
                                                         check_invariants=True)
                else:
                    param.grad = torch.zeros(2).index_fill_(0, torch.tensor(1 - coordinate), grad)
                opt.step()
                for scheduler in schedulers:
                    scheduler.step(rosenbrock(param.detach())) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            assert_same(sides[0][0], sides[1][0], atol=5e-6, rtol=5e-6)
            assert_same(sides[0][0], sides[2][0])
        assert sides[0][0].detach().dist(torch.ones(2)) <= math.dist([1.5, 1.5], [1, 1])  # towards (1, 1)


# ---- differentiable=True: gradients through step() ----

def _one_step(p, grad, state, cls, kwargs, *state_tensors):
    """p after one step of cls from `state`, and the state tensors that carry gradients: a
    function of p, grad and the state for gradcheck (state_tensors lets it see them as inputs)."""
    p = p.clone()
    p.grad = grad
    opt = cls([p], **kwargs)
    opt.state[p].update({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    opt.step()
    return (p,) + tuple(v for v in opt.state[p].values() if torch.is_tensor(v) and v.requires_grad)


def _two_steps_then_loss(p, grad, state, cls, kwargs, *inputs):
    """The loss after two steps of training (x * sum(p) - y)^2 with the graph of the first step
    kept: a function of the tensor hyperparameters in kwargs (lr, weight_decay, beta1, beta2)."""
    p = p.clone()
    p.grad = grad
    kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    if "beta1" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1"), kwargs.pop("beta2"))
    hyper = [v for v in kwargs.values() if torch.is_tensor(v) and v.requires_grad] + list(kwargs.get("betas", ()))
    opt = cls([p], **kwargs)
    opt.state[p].update({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(x * p.sum(), y)
        loss.backward(inputs=(p,), create_graph=True)
        opt.step()
        opt.zero_grad()
    loss.backward(inputs=tuple(hyper), create_graph=True)
    assert all(h.grad is not None for h in hyper)
    return (loss,) + tuple(v for v in opt.state[p].values() if torch.is_tensor(v) and v.requires_grad) + tuple(hyper)


def _rand(*shape, requires_grad=True):
    return torch.rand(*shape, dtype=torch.float64, requires_grad=requires_grad)


def _state(name):
    if name == "SGD":
        return {"momentum_buffer": _rand(10)}
    # 'step' is a count, not a continuous variable: no gradient through it
    return {"step": torch.tensor(10.0, dtype=torch.float64), "exp_avg": _rand(10),
            "exp_avg_sq": _rand(10), "max_exp_avg_sq": _rand(10)}


def test_gradcheck_through_a_step(subject):
    torch.manual_seed(6)
    name = subject.cls.__name__
    kwargs = {"lr": 0.9, "differentiable": True} | ({} if name == "SGD" else {"amsgrad": True})
    state = _state(name)
    assert torch.autograd.gradcheck(_one_step, (_rand(10), _rand(10), state, subject.cls, kwargs, *state.values()))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's test does it too
@pytest.mark.parametrize("hyperparameters", ["lr", "weight_decay", "betas", "all"])
def test_gradcheck_through_tensor_hyperparameters(subject, hyperparameters):
    name = subject.cls.__name__
    if hyperparameters == "betas" and name == "SGD":
        pytest.skip("SGD has no betas")
    torch.manual_seed(7)
    chosen = {"lr": {"lr": _rand(())}, "weight_decay": {"weight_decay": _rand(())},
              "betas": {"beta1": torch.tensor(0.9, dtype=torch.float64, requires_grad=True),
                        "beta2": torch.tensor(0.999, dtype=torch.float64, requires_grad=True)}}
    kwargs = {"differentiable": True}
    for key in (chosen if hyperparameters == "all" else [hyperparameters]):
        if not (key == "betas" and name == "SGD"):
            kwargs.update(chosen[key])
    if "lr" in kwargs:
        kwargs["lr"] = kwargs["lr"].detach().mul(1e-3).requires_grad_()
    state = _state(name)
    assert torch.autograd.gradcheck(_two_steps_then_loss, (_rand(10), _rand(10), state, subject.cls, kwargs,
                                                           *state.values(), *kwargs.values()))


# ---- GradScaler with a group that torch's for-loop steps ----

def test_grad_scaler_tensors_apply_to_torch_loop_groups(subject):
    """GradScaler hands fusedtrain's optimizers grad_scale and found_inf instead of unscaling: a
    group that torch's for-loop steps (here a param listed twice) skips on found_inf and unscales
    otherwise, as the fused groups do."""
    results = []
    for scaled in (False, True):
        weight, bias, x = linear_problem()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = subject.cls([{"params": [weight]}, {"params": [bias, bias]}], lr=0.1)
        for found_inf in (0.0, 1.0, 0.0):
            opt.zero_grad()
            linear_loss(weight, bias, x).mul(1024.0 if scaled else 1.0).backward()
            if scaled:
                opt.grad_scale, opt.found_inf = torch.tensor([1024.0]), torch.tensor([found_inf])
            elif found_inf:
                continue
            opt.step()
        results.append([weight.detach(), bias.detach(), bias.grad])
    assert_same(*results)
