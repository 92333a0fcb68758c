"""fusedtrain.optim.SGD: torch.optim.SGD with the same constructor, param groups, state and
state_dict, whose step() is one fused kernel call per device."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fusedtrain.optim import _common, _torch_loop
from fusedtrain.optim._base import MultiTensorOptimizer


class SgdBucket(NamedTuple):
    """The tensors of one sgd_step_ call: a param group's params on one device."""

    device: torch.device
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

    def _make_plan(self, group: dict, params: list[Tensor]) -> SgdPlan:
        """Params whose momentum buffer exists (or that need none), by device, and the params
        that start a buffer this step: torch starts it as a copy of the first gradient, so
        those take a separate first_step call and the plan is rebuilt afterwards."""
        if group["momentum"] == 0:
            return SgdPlan(_buckets(params, None), [])
        buffer_of = [self.state[p].get("momentum_buffer") for p in params]
        continuing = [p for p, b in zip(params, buffer_of) if b is not None]
        starting = [p for p, b in zip(params, buffer_of) if b is None]
        return SgdPlan(_buckets(continuing, [b for b in buffer_of if b is not None]),
                       _buckets(starting, None))

    def _run_plan(self, group: dict, plan: SgdPlan) -> None:
        for bucket in plan.continuing:
            self._call(group, bucket, first_step=False)
        for bucket in plan.starting:
            new_buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in bucket.params]
            if self._call(group, bucket._replace(buffers=new_buffers), first_step=True):
                for p, b in zip(bucket.params, new_buffers):
                    self.state[p]["momentum_buffer"] = b
        if plan.starting:
            self._forget_plan(group)

    def _call(self, group: dict, bucket: SgdBucket, first_step: bool) -> bool:
        """Runs sgd_step_ on a bucket; False if GradScaler's found_inf skipped a first step. Only
        a first step reads found_inf on the host (whether its new buffers are kept), so a step of
        existing buffers never waits for the device."""
        grad_scale, found_inf = _common.amp_tensors(self, bucket.device)
        lr, lr_tensor = _common.lr_arguments(group["lr"], bucket.device)
        updated = (bucket.params, [p.grad for p in bucket.params], bucket.buffers)
        if bucket.has_complex:
            updated = map(_common.real_views, updated)
        self._kernel("sgd_step_", bucket.device)(
            *updated,
            lr,
            group["momentum"],
            group["dampening"],
            _common.as_float(group["weight_decay"]),
            group["nesterov"],
            group["maximize"],
            first_step,
            grad_scale,
            found_inf,
            lr_tensor,
        )
        return not first_step or found_inf is None or not bool(found_inf.item() != 0)


def _buckets(params: list[Tensor], buffers: list[Tensor] | None) -> list[SgdBucket]:
    """One bucket per device; buffers None: no momentum buffers (yet)."""
    return [
        SgdBucket(device, [params[i] for i in indices],
                  [buffers[i] for i in indices] if buffers is not None else [],
                  any(params[i].is_complex() for i in indices))
        for device, indices in _common.group_by_device(params).items()
    ]
