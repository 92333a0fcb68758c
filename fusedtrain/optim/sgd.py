"""fusedtrain.optim.SGD: torch.optim.SGD with the same constructor, param groups, state and
state_dict, whose step() is one fused kernel call per device."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fusedtrain.optim import _common, _torch_loop
from fusedtrain.optim._base import NO_STATE, MultiTensorOptimizer, PlannedState


class SgdBucket(NamedTuple):
    """One sgd_step_ call: params of a plan on one device, with their momentum buffers."""

    kernel: Callable[..., None]  # sgd_step_ of the optimizer's backend on that device
    device: torch.device
    positions: list[int] | None  # of its params among the plan's (see _common.device_positions)
    params: list[Tensor]
    buffers: list[Tensor]  # empty without momentum, or before the buffers exist
    has_complex: bool  # then the kernel takes real views (see _common.real_views)


class SgdPlan(NamedTuple):
    continuing: list[SgdBucket]  # params with a momentum buffer, or without momentum
    starting: list[SgdBucket]  # params whose momentum buffer starts this step


class SGD(MultiTensorOptimizer):
    """Drop-in for :class:`torch.optim.SGD` (same arguments and defaults).

    ``foreach`` and ``fused`` are accepted and the step is always fused; ``fused=True`` refuses
    what torch's does (params that are not real floating point on a device with fused kernels,
    sparse gradients, ``foreach=True``, ``differentiable=True``). Complex params are updated as
    pairs of reals, as torch does. A group with a sparse gradient, with ``differentiable=True``,
    or listing a param twice is stepped by torch's own for-loop (see
    ``fusedtrain.optim._torch_loop``). ``backend`` ("auto", "native", "reference") picks the
    implementation.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        _common.check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _common.check_flags(foreach, fused, differentiable, backend)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in (("nesterov", False), ("maximize", False), ("foreach", None),
                                 ("differentiable", False), ("fused", None)):
                group.setdefault(key, default)

    def _check_state(self, group_index: int, group: dict) -> None:
        if group["momentum"] != 0:
            for where, p, state in _common.existing_states(self, group_index, group):
                if state.get("momentum_buffer") is not None:
                    _common.check_state_tensor("SGD", state, "momentum_buffer", p, where)

    def _plan_flags(self, group: dict) -> tuple:
        return (group["momentum"] != 0,)

    _takes_sparse_grads = True
    _check_torch_loop = _torch_loop.check_sgd
    _step_torch_loop = _torch_loop.step_sgd

    def _make_plan(self, group: dict, params: list[Tensor]) -> tuple[SgdPlan, PlannedState]:
        """Params whose momentum buffer exists (or that need none), by device, and the params
        that start a buffer this step: torch starts it as a copy of the first gradient, so
        those take a separate first_step call and the plan is rebuilt afterwards."""
        everything = range(len(params))
        if group["momentum"] == 0:
            return SgdPlan(self._buckets(params, everything, None), []), NO_STATE
        states = [self.state[p] for p in params]
        buffer_of = [s.get("momentum_buffer") for s in states]
        continuing = [i for i in everything if buffer_of[i] is not None]
        starting = [i for i in everything if buffer_of[i] is None]
        plan = SgdPlan(self._buckets(params, continuing, buffer_of), self._buckets(params, starting, None))
        return plan, PlannedState([states[i] for i in continuing], ("momentum_buffer",),
                                  [buffer_of[i] for i in continuing])

    def _buckets(self, params: list[Tensor], positions: list[int],
                 buffer_of: list[Tensor] | None) -> list[SgdBucket]:
        """The calls that step params[i] for i in positions, one per device; buffer_of None: no
        momentum buffers (yet)."""
        buckets = []
        for device, taken in _common.device_positions(params, positions):
            bucket_params = _common.take(params, taken)
            buckets.append(SgdBucket(
                self._kernel("sgd_step_", device, bucket_params),
                device,
                taken,
                bucket_params,
                _common.take(buffer_of, taken) if buffer_of is not None else [],
                any(p.is_complex() for p in bucket_params),
            ))
        return buckets

    def _run_plan(self, group: dict, calls: SgdPlan, grads: list[Tensor]) -> None:
        for bucket in calls.continuing:
            self._call(bucket, group, grads, first_step=False)
        for bucket in calls.starting:
            new_buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in bucket.params]
            if self._call(bucket._replace(buffers=new_buffers), group, grads, first_step=True):
                for p, b in zip(bucket.params, new_buffers):
                    self.state[p]["momentum_buffer"] = b
        if calls.starting:
            self._forget_plan(group)

    def _call(self, bucket: SgdBucket, group: dict, grads: list[Tensor], first_step: bool) -> bool:
        """Runs sgd_step_ on a bucket; False if GradScaler's found_inf skipped a first step. Only
        a first step reads found_inf on the host (whether its new buffers are kept), so a step of
        existing buffers never waits for the device."""
        grad_scale, found_inf = _common.amp_tensors(self, bucket.device)
        lr, lr_tensor = _common.lr_arguments(group["lr"], bucket.device)
        updated = (bucket.params, _common.take(grads, bucket.positions), bucket.buffers)
        if bucket.has_complex:
            updated = map(_common.real_views, updated)
        bucket.kernel(*updated, lr, group["momentum"], group["dampening"],
                      _common.as_float(group["weight_decay"]), group["nesterov"], group["maximize"],
                      first_step, grad_scale, found_inf, lr_tensor)
        return not first_step or found_inf is None or not bool(found_inf.item() != 0)
