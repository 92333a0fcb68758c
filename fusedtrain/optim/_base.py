"""The step() that every fusedtrain optimizer shares: closure, checks, then one kernel call per
param group and device (or torch.optim's own for-loop for the few groups that need it: see
_torch_loop)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from fusedtrain import _dispatch
from fusedtrain.optim import _common, _dtensor


class MultiTensorOptimizer(Optimizer):
    """A torch.optim.Optimizer whose step updates each param group with one multi-tensor op.

    Subclasses provide `_check_state` (validate existing per-param state, mutating nothing),
    `_make_plan` (create missing state and gather the tensor lists of a group's kernel calls)
    and `_run_plan` (make those calls). Plans are cached: a step over many small tensors is
    dominated by Python bookkeeping otherwise. A plan is rebuilt when the set of params with a
    gradient changes, and all plans are dropped when state comes in through load_state_dict.
    """

    def __init__(self, params, defaults: dict, backend: str) -> None:
        self.backend = backend
        super().__init__(params, defaults)
        self._reset_step_caches()

    def _reset_step_caches(self) -> None:
        # torch.amp.GradScaler then hands over grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        # State this optimizer created is right by construction; state that came in through
        # load_state_dict (or unpickling) is checked in full once, at the next step.
        self._state_needs_check = True
        self._plans: dict[int, tuple[tuple, object]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self._reset_step_caches()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._reset_step_caches()

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every param group; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every group before the first kernel runs, so a bad group mutates nothing.
        self._check_graph_capture()
        name = type(self).__name__
        updates = [_common.params_with_grad(name, group, self._takes_sparse_grads) for group in self.param_groups]
        if self._state_needs_check:
            for index, group in enumerate(self.param_groups):
                self._check_state(index, group)
            self._state_needs_check = False
        # A group whose plan is rebuilt (first step, or another set of params with a gradient) has
        # its params checked here, for all groups at once: the op checks only its own call, and
        # an earlier group's call would already have run. Cached plans skip it, as it costs as
        # much as the step for small tensors. Groups that torch's for-loop steps (see _torch_loop)
        # are checked at every step.
        plans = []  # per group: (key, cached plan or None), TORCH_LOOP, or None without params to update
        for index, (group, (params, sparse)) in enumerate(zip(self.param_groups, updates)):
            if not params:
                plans.append(None)
                continue
            if sparse or group["differentiable"]:
                _check_params_with_grad(name, index, group)
                self._check_torch_loop(index, group)
                plans.append(TORCH_LOOP)
                continue
            key = self._plan_key(group, params)
            cached = self._plans.get(id(group))
            if cached is None or cached[0] != key:
                _check_params_with_grad(name, index, group)
                _dtensor.check_grads(name, params)
                cached = None
                if len(set(key[0])) != len(key[0]):  # a param listed twice (never cached)
                    self._check_torch_loop(index, group)
                    plans.append(TORCH_LOOP)
                    continue
            plans.append((key, cached))
        for group, (params, _), planned in zip(self.param_groups, updates, plans):
            if planned is None:
                continue
            if planned is TORCH_LOOP:
                self._forget_plan(group)
                # torch.optim records autograd history when its defaults say differentiable
                with torch.set_grad_enabled(self.defaults["differentiable"]):
                    self._step_torch_loop(group)
                continue
            key, cached = planned
            if cached is None:
                cached = self._plans[id(group)] = (key, self._make_plan(group, params))
            self._run_plan(group, cached[1])
        return loss

    def _plan_key(self, group: dict, params: list[Tensor]) -> tuple:
        # Params are compared by identity: Tensor.__eq__ is elementwise.
        return (tuple(map(id, params)), self._plan_flags(group))

    def _kernel(self, name: str, device: torch.device) -> Callable[..., None]:
        """The op `name` of this optimizer's backend on `device`, taking DTensor params (FSDP2,
        tensor parallelism) by their local shards."""
        return _dtensor.on_local_shards(_dispatch.op(name, self.backend, device))

    def _forget_plan(self, group: dict) -> None:
        self._plans.pop(id(group), None)

    def _check_graph_capture(self) -> None:
        """Refuses a step that CUDA graph capture is recording, where the optimizer forbids it."""

    def _plan_flags(self, group: dict) -> tuple:
        """Hyperparameters that change which state tensors a plan holds."""
        raise NotImplementedError

    def _check_state(self, group_index: int, group: dict) -> None:
        raise NotImplementedError

    def _make_plan(self, group: dict, params: list[Tensor]):
        raise NotImplementedError

    def _run_plan(self, group: dict, plan) -> None:
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
