"""fusedtrain.optim.SGD: torch.optim.SGD with the same constructor, param groups, state and
state_dict, whose step() is one fused kernel call per device."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fusedtrain import _dispatch
from fusedtrain.optim import _common
from fusedtrain.optim._base import MultiTensorOptimizer


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

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        if group["momentum"] == 0:
            self._run(group, params, [], first_step=False)
            return
        # torch starts a momentum buffer as a copy of the first gradient it sees, param by param:
        # params that have a buffer and params that start one take separate kernel calls.
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        continuing = [i for i, b in enumerate(buffers) if b is not None]
        starting = [i for i, b in enumerate(buffers) if b is None]
        if continuing:
            self._run(group, [params[i] for i in continuing], [buffers[i] for i in continuing],
                      first_step=False)
        if starting:
            new_params = [params[i] for i in starting]
            new_buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in new_params]
            if self._run(group, new_params, new_buffers, first_step=True):
                for p, b in zip(new_params, new_buffers):
                    self.state[p]["momentum_buffer"] = b

    def _run(self, group: dict, params: list[Tensor], buffers: list[Tensor], first_step: bool) -> bool:
        """Runs the kernel on `params`; False if GradScaler's found_inf skipped the step."""
        skipped = False
        for device, indices in _common.group_by_device(params).items():
            grad_scale, found_inf = _common.amp_tensors(self, device)
            _dispatch.op("sgd_step_", self.backend, device)(
                [params[i] for i in indices],
                [params[i].grad for i in indices],
                [buffers[i] for i in indices] if buffers else [],
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
