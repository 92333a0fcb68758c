"""fusedtrain.optim.SGD: torch.optim.SGD with the same constructor, param groups, state and
state_dict, whose step() is one fused kernel call per device."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fusedtrain import _dispatch
from fusedtrain.optim import _common
from fusedtrain.optim._base import MultiTensorOptimizer


class SgdBucket(NamedTuple):
    """The tensors of one sgd_step_ call (device None: not yet split by device)."""

    device: torch.device | None
    params: list[Tensor]
    buffers: list[Tensor]  # empty without momentum


class SgdPlan(NamedTuple):
    continuing: list[SgdBucket]
    starting: list[Tensor]


class SGD(MultiTensorOptimizer):
    """Drop-in for :class:`torch.optim.SGD` (same arguments and defaults).

    ``foreach`` and ``fused`` are accepted and ignored: the step is always fused. ``backend``
    ("auto", "native", "reference") picks the implementation.
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
        _common.check_supported("SGD", False, differentiable, backend)
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

    def _make_plan(self, group: dict, params: list[Tensor]) -> SgdPlan:
        """Params whose momentum buffer exists (or that need none), by device, and the params
        that start a buffer this step: torch starts it as a copy of the first gradient, so
        those take a separate first_step call and the plan is rebuilt afterwards."""
        if group["momentum"] == 0:
            continuing, buffers, starting = params, None, []
        else:
            buffer_of = [self.state[p].get("momentum_buffer") for p in params]
            continuing = [p for p, b in zip(params, buffer_of) if b is not None]
            buffers = [b for b in buffer_of if b is not None]
            starting = [p for p, b in zip(params, buffer_of) if b is None]
        buckets = [
            SgdBucket(device, [continuing[i] for i in indices],
                      [buffers[i] for i in indices] if buffers is not None else [])
            for device, indices in _common.group_by_device(continuing).items()
        ]
        return SgdPlan(buckets, starting)

    def _run_plan(self, group: dict, plan: SgdPlan) -> None:
        for bucket in plan.continuing:
            self._call(group, bucket, first_step=False)
        if plan.starting:
            new_buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in plan.starting]
            if self._call(group, SgdBucket(None, plan.starting, new_buffers), first_step=True):
                for p, b in zip(plan.starting, new_buffers):
                    self.state[p]["momentum_buffer"] = b
                self._forget_plan(group)

    def _call(self, group: dict, bucket: SgdBucket, first_step: bool) -> bool:
        """Runs sgd_step_ on the bucket (per device if it has none); False if GradScaler's
        found_inf skipped the step."""
        skipped = False
        by_device = ({bucket.device: range(len(bucket.params))} if bucket.device is not None
                     else _common.group_by_device(bucket.params))
        for device, indices in by_device.items():
            params = [bucket.params[i] for i in indices]
            grad_scale, found_inf = _common.amp_tensors(self, device)
            _dispatch.op("sgd_step_", self.backend, device)(
                params,
                [p.grad for p in params],
                [bucket.buffers[i] for i in indices] if bucket.buffers else [],
                _common.as_float(group["lr"]),
                group["momentum"],
                group["dampening"],
                _common.as_float(group["weight_decay"]),
                group["nesterov"],
                group["maximize"],
                first_step,
                grad_scale,
                found_inf,
            )
            skipped = skipped or (found_inf is not None and bool(found_inf.item() != 0))
        return not skipped
