"""The step() that every fusedtrain optimizer shares: closure, checks, then one kernel call per
param group and device."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from fusedtrain.optim import _common


class MultiTensorOptimizer(Optimizer):
    """A torch.optim.Optimizer whose step updates each param group with one multi-tensor op.

    Subclasses provide `_check_state` (validate existing per-param state, mutating nothing) and
    `_update_group` (create missing state and run the op)."""

    def __init__(self, params, defaults: dict, backend: str) -> None:
        self.backend = backend
        super().__init__(params, defaults)
        # torch.amp.GradScaler then hands over grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        # State the optimizer created itself is right by construction; state that came in
        # through load_state_dict is checked once, in full, at the next step.
        self._state_needs_check = True
        self.register_load_state_dict_post_hook(_request_state_check)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_state_needs_check", True)

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every param group; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every group before the first kernel runs, so a bad group mutates nothing.
        name = type(self).__name__
        updates = [_common.params_with_grad(name, group) for group in self.param_groups]
        if self._state_needs_check:
            for index, group in enumerate(self.param_groups):
                self._check_state(index, group)
            self._state_needs_check = False
        for group, params in zip(self.param_groups, updates):
            if params:
                self._update_group(group, params)
        return loss

    def _check_state(self, group_index: int, group: dict) -> None:
        raise NotImplementedError

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError


def _request_state_check(optimizer: MultiTensorOptimizer) -> None:
    optimizer._state_needs_check = True
