"""The step() that every fusedtrain optimizer shares: closure, checks, then one kernel call per
param group and device (or torch.optim's own for-loop for the few groups that need it: see
_torch_loop)."""

from __future__ import annotations

import functools
from itertools import chain
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer
from torch.optim.optimizer import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from fusedtrain import _dispatch, _extension
from fusedtrain.optim import _common, _dtensor


class PlannedState(NamedTuple):
    """The optimizer state that a plan's kernel calls hold: dicts[i][keys[k]] is
    tensors[i * len(keys) + k], where dicts[i] is optimizer.state[param] of the plan's i-th param."""

    dicts: list[dict]
    keys: tuple[str, ...]
    tensors: list[Tensor]


NO_STATE = PlannedState([], (), [])


class GroupPlan(NamedTuple):
    """A param group's step as the subclass planned it (`calls`, see _make_plan), with what it was
    planned from, which the step compares at C speed before using it again."""

    group: dict  # the group it steps; held, so id(group), the plan's key, stays the group's own
    params: list[Tensor]  # a copy of group["params"]
    with_grad: list[Tensor]  # those that had a gradient: the params the calls update, in order
    without_grad: list[Tensor]
    flags: tuple  # (differentiable, *_plan_flags(group))
    state: PlannedState
    calls: object

    def current_grads(self, optimizer: MultiTensorOptimizer, group: dict) -> list[Tensor] | None:
        """The gradients of with_grad if the plan still holds, else None: the group's params, its
        flags and the planned state tensors are the same objects, the same params have a
        gradient and each gradient is one the kernels take as it is (see _C.step_grads).
        Whether optimizer.state still maps each param to the same per-param dict is the
        optimizer's check (see _state_unchanged)."""
        if (self.flags != optimizer._flags(group)
                or not _CHECKS.same_objects(group["params"], self.params)
                or not _CHECKS.entries_are(*self.state)):
            return None
        return _CHECKS.step_grads(self.with_grad, self.without_grad)


# The C-speed checks of cached plans. Without the compiled extension every step plans anew: the
# reference path that then runs costs far more anyway.
_CHECKS = _extension._C if _extension.native_available() else None


def _with_step_hooks(step: Callable) -> Callable:
    """What torch.optim.Optimizer.profile_hook_step wraps around every optimizer's step: the
    global and per-optimizer pre- and post-hooks, and the profiler's range named
    "Optimizer.step#<class>.step", here recorded by torch's C++ _RecordFunctionFast, as cheap as
    a Python call, where torch's record_function costs ~10 us: a seventh of a fused step over
    100 small tensors. (Under torch.compile, record_function, which dynamo knows.) Marked
    hooked, so that torch does not wrap the step again."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        name = f"Optimizer.step#{type(self).__name__}.step"
        record = (torch.autograd.profiler.record_function if torch.compiler.is_compiling()
                  else torch._C._profiler._RecordFunctionFast)
        with record(name):
            for pre_hook in chain(torch_optimizer._global_optimizer_pre_hooks.values(),
                                  self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{step} must return None or a tuple of (new_args, "
                                           f"new_kwargs), but got {result}.")
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(),
                                   torch_optimizer._global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True
    return wrapper


class MultiTensorOptimizer(Optimizer):
    """A torch.optim.Optimizer whose step updates each param group with one multi-tensor op.

    Subclasses provide `_check_state` (validate existing per-param state, mutating nothing),
    `_make_plan` (create missing state and gather the tensor lists of a group's kernel calls)
    and `_run_plan` (make those calls with the step's gradients).

    Plans are cached: gathering the lists costs more than the kernel for many small tensors. A
    step reads and writes the tensors that optimizer.state holds at that moment, so a cached plan
    is used only while all it was built from is unchanged: the group and its params, which of
    them have a gradient (dense, fitting its param), the flags that decide its state tensors,
    the tensors themselves in each per-param state dict, the per-param dicts in optimizer.state
    and optimizer.state itself (whatever replaced, cleared or added them: load_state_dict, a
    tensor put in by hand, state.clear()). Checking that takes a few C loops per step (see
    GroupPlan.current_grads); anything else plans the group anew, with the full checks of its
    params and existing state before any group is stepped. The kernels of backend "auto" are
    picked (FUSEDTRAIN_BACKEND read) when a group is planned.
    """

    def __init__(self, params, defaults: dict, backend: str) -> None:
        self.backend = backend
        super().__init__(params, defaults)
        self._reset_step_caches()

    def _reset_step_caches(self) -> None:
        # torch.amp.GradScaler then hands over grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        self._plans: dict[int, GroupPlan] = {}
        # (optimizer.state, its keys, its values) when plans were last made.
        self._state_seen: tuple = (None, [], [])

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self._reset_step_caches()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._reset_step_caches()

    @_with_step_hooks
    def step(self, closure=None):
        """One step over every param group; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_graph_capture()
        if torch.compiler.is_compiling():
            with torch.no_grad():
                # dynamo runs _init_group eagerly (see there)
                for group in self.param_groups:
                    self._init_group(group)
                self._step_groups(compiling=True)
            return loss
        # torch.no_grad() as a context costs more than a step's Python around the kernel calls
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_groups(compiling=False)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return loss

    def _step_groups(self, compiling: bool) -> None:
        # Under torch.compile nothing is cached: dynamo guards on what the traced step reads
        # (params, gradients, state, hyperparameters), which takes the cache's place.
        plans = self._plans if not compiling and self._state_unchanged() else {}
        steps = []  # per group: the cached plan and the gradients to step it with, or None
        for group in self.param_groups:
            plan = plans.get(id(group))
            grads = None if plan is None else plan.current_grads(self, group)
            steps.append(None if grads is None else (plan, grads))
        stale = [index for index, ready in enumerate(steps) if ready is None]
        # Every group is checked before the first one is stepped, so a bad group mutates nothing.
        planned = self._check_groups(stale) if stale else {}
        for index, (group, ready) in enumerate(zip(self.param_groups, steps)):
            if ready is None:
                params = planned[index]
                if params is TORCH_LOOP:
                    self._forget_plan(group)
                    # torch.optim records autograd history when its defaults say differentiable
                    with torch.set_grad_enabled(self.defaults["differentiable"]):
                        self._step_torch_loop(group)
                    continue
                plan = self._plan_group(group, params)
                if not compiling:
                    self._plans[id(group)] = plan
                ready = (plan, [p.grad for p in params])
            plan, grads = ready
            if grads:
                self._run_plan(group, plan.calls, grads)
        if stale and not compiling:
            self._remember_state()

    def _check_groups(self, indices: list[int]) -> dict[int, list[Tensor] | object]:
        """The full checks of the groups at `indices`, none of which has a plan that holds, all
        before any group is stepped: per group, its params with a gradient, or TORCH_LOOP.

        The ops check their own call only, and an earlier group's call would already have run;
        so the params (and, for a plan made from it, the existing state) are checked here.
        """
        name = type(self).__name__
        planned = {}
        for index in indices:
            group = self.param_groups[index]
            params, sparse = _common.params_with_grad(name, group, self._takes_sparse_grads)
            if params:
                _check_params_with_grad(name, index, group)
                if sparse or group["differentiable"] or len(set(map(id, params))) != len(params):
                    # sparse SGD, differentiable=True, a param listed twice (see _torch_loop)
                    self._check_torch_loop(index, group)
                    params = TORCH_LOOP
                else:
                    _dtensor.check_grads(name, params)
                    self._check_state(index, group)
            planned[index] = params
        return planned

    def _plan_group(self, group: dict, params: list[Tensor]) -> GroupPlan:
        """A new plan for `group` (creating the state its params lack); params: those with a
        gradient."""
        calls, state = self._make_plan(group, params) if params else (None, NO_STATE)
        planned = set(map(id, params))
        return GroupPlan(group, list(group["params"]), params,
                         [p for p in group["params"] if id(p) not in planned],
                         self._flags(group), state, calls)

    def _state_unchanged(self) -> bool:
        """Whether optimizer.state is the dict, with the same per-param dicts under the same
        params, that the cached plans were made against."""
        state, keys, values = self._state_seen
        return state is self.state and _CHECKS is not None and _CHECKS.same_items(state, keys, values)

    def _remember_state(self) -> None:
        self._state_seen = (self.state, list(self.state), list(self.state.values()))
        # Plans of groups no longer in param_groups would keep their tensors alive.
        groups = set(map(id, self.param_groups))
        self._plans = {key: plan for key, plan in self._plans.items() if key in groups}

    def _flags(self, group: dict) -> tuple:
        return (group["differentiable"], *self._plan_flags(group))

    def _init_group(self, group: dict) -> None:
        """Under torch.compile, before the step is traced: creates the state that the group's
        params with a gradient lack. Dynamo runs the method of this name eagerly, outside the
        graph (as for torch.optim's optimizers, see torch/_dynamo/variables/optimizer.py), so
        the first graph reads state that exists, rather than creating it and being compiled
        again for the next step, which finds it. (SGD has none to create: its momentum buffers
        start in the first step.)"""

    def _kernel(self, name: str, device: torch.device, params: list[Tensor]) -> Callable[..., None]:
        """The op `name` of this optimizer's backend on `device` for a call over `params`, taking
        DTensor params (FSDP2, tensor parallelism) by their local shards."""
        kernel = _dispatch.op(name, self.backend, device)
        return _dtensor.on_local_shards(kernel) if _dtensor.has_dtensor(params) else kernel

    def _forget_plan(self, group: dict) -> None:
        self._plans.pop(id(group), None)

    def _check_graph_capture(self) -> None:
        """Refuses a step that CUDA graph capture is recording, where the optimizer forbids it."""

    def _plan_flags(self, group: dict) -> tuple:
        """Hyperparameters that change which state tensors a plan holds."""
        raise NotImplementedError

    def _check_state(self, group_index: int, group: dict) -> None:
        raise NotImplementedError

    def _make_plan(self, group: dict, params: list[Tensor]) -> tuple[object, PlannedState]:
        """The kernel calls that step `params` (the group's params with a gradient; their
        missing state is created here), and the state tensors those calls hold."""
        raise NotImplementedError

    def _run_plan(self, group: dict, calls, grads: list[Tensor]) -> None:
        """Makes the planned calls with the group's hyperparameters now; grads[i] is the
        gradient of the plan's i-th param."""
        raise NotImplementedError

    # Whether the optimizer takes sparse gradients (then stepped by torch's for-loop)
    _takes_sparse_grads = False

    def _check_torch_loop(self, group_index: int, group: dict) -> None:
        """Raises what torch.optim would raise stepping this group, before any group moves."""
        raise NotImplementedError

    def _step_torch_loop(self, group: dict) -> None:
        """Steps the group with torch.optim's own for-loop (see _torch_loop)."""
        raise NotImplementedError


# The plan of a group that torch.optim's for-loop steps (see _torch_loop)
TORCH_LOOP = object()


# Complex params go to the kernels as pairs of reals (see _common.real_views).
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16,
                  torch.complex64, torch.complex128)


def _check_params_with_grad(optimizer: str, group_index: int, group: dict) -> None:
    """What the optimizer ops refuse, named as the user knows the param. RuntimeError, as
    torch.optim raises for a gradient that does not fit its param. A group asking for fused=True
    is refused what torch's fused=True refuses (a meta param, a complex one), in torch's words, so
    code behaves the same with either optimizer."""
    for index, p in enumerate(group["params"]):
        grad = p.grad
        if grad is None:
            continue
        where = f"{optimizer}: param {index} of param group {group_index}"
        if group["fused"]:
            fused_devices = _get_fused_kernels_supported_devices()
            if p.device.type not in fused_devices or not torch.is_floating_point(p):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                                   f"of supported devices: {fused_devices} but {p.dtype} and "
                                   f"{p.device.type} ({where})")
        if p.dtype not in _KERNEL_DTYPES:
            raise RuntimeError(f"{where} has dtype {p.dtype}; the fused kernels take float32, "
                               "float64, bfloat16 and float16 params, and complex64 and complex128 "
                               "ones as pairs of reals")
        if grad.shape != p.shape:
            raise RuntimeError(f"{where} has shape {tuple(p.shape)} but its grad has shape "
                               f"{tuple(grad.shape)}")
        if grad.dtype != p.dtype or grad.device != p.device:
            raise RuntimeError(f"{where} is {p.dtype} on {p.device} but its grad is {grad.dtype} "
                               f"on {grad.device}")
