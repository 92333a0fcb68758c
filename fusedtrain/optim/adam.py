"""fusedtrain.optim.Adam and AdamW: torch.optim.Adam / AdamW with the same constructor, param
groups, state (keys, dtypes) and state_dict, whose step() is one fused kernel call per device."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from fusedtrain.optim import _common, _torch_loop
from fusedtrain.optim._base import MultiTensorOptimizer, PlannedState


class AdamBucket(NamedTuple):
    """One adam_step_ call: the params of a plan on one device, with their state."""

    kernel: Callable[..., None]  # adam_step_ of the optimizer's backend on that device
    device: torch.device
    positions: list[int] | None  # of its params among the plan's (see _common.device_positions)
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    has_complex: bool  # then the kernel takes real views (see _common.real_views)


class Adam(MultiTensorOptimizer):
    """Drop-in for :class:`torch.optim.Adam` (same arguments and defaults).

    ``foreach`` and ``fused`` are accepted and the step is always fused; ``fused=True`` refuses
    what torch's does (params that are not real floating point on a device with fused kernels,
    ``foreach=True``, ``differentiable=True``). The step never waits for the device, so
    ``capturable=True`` (CUDA graph capture of ``step()``) works on the native CUDA kernels, with a
    tensor ``lr`` on the device read by the kernel. Complex params are updated as pairs of reals,
    as torch does. A group with ``differentiable=True``, or listing a param twice, is stepped by
    torch's own for-loop (see ``fusedtrain.optim._torch_loop``). ``backend`` ("auto", "native",
    "triton", "reference") picks the implementation; see ``python -m fusedtrain info``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
    ) -> None:
        # torch refuses tensor hyperparameters with foreach=True (its foreach step cannot take
        # them unless capturable); fusedtrain's step can, but refuses as torch does for drop-in.
        tensor_foreach = "as a Tensor is not supported for capturable=False and foreach=True"
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError(f"lr {tensor_foreach}")
        _common.check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for index in (0, 1):
            if isinstance(betas[index], Tensor) and betas[index].numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
            if not 0.0 <= betas[index] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        if isinstance(betas[0], Tensor) and foreach and not capturable:
            raise ValueError(f"betas[0] {tensor_foreach}")
        _common.check_flags(foreach, fused, differentiable, backend)
        defaults = {
            "lr": lr,
            "betas": tuple(_common.as_scalar(b) for b in betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, backend)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in (("amsgrad", False), ("maximize", False), ("foreach", None),
                                 ("capturable", False), ("differentiable", False),
                                 ("fused", None), ("decoupled_weight_decay", False)):
                group.setdefault(key, default)
        for p, param_state in self.state.items():
            step = param_state.get("step")
            if step is not None and not torch.is_tensor(step):  # torch < 1.12 kept a Python number
                param_state["step"] = torch.tensor(float(step), dtype=_common.step_dtype())

    def _check_graph_capture(self) -> None:
        # torch.optim.Adam's rule: capturing a step needs capturable=True. Only a process that
        # has touched CUDA can be capturing, which spares CPU steps the check's cost.
        if torch.cuda.is_initialized():
            self._cuda_graph_capture_health_check()

    def _check_state(self, group_index: int, group: dict) -> None:
        name = type(self).__name__
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        for where, p, state in _common.existing_states(self, group_index, group):
            _common.check_step_tensor(name, state, where)
            for key in keys:
                _common.check_state_tensor(name, state, key, p, where)

    def _plan_flags(self, group: dict) -> tuple:
        return (group["amsgrad"],)

    _check_torch_loop = _torch_loop.check_adam
    _step_torch_loop = _torch_loop.step_adam

    def _make_plan(self, group: dict, params: list[Tensor]) -> tuple[list[AdamBucket], PlannedState]:
        amsgrad = group["amsgrad"]
        states = [self._init_state(p, amsgrad) for p in params]
        for p, state in zip(params, states):
            if p.is_cuda and state["step"].device != p.device:  # e.g. torch.optim's CPU step, loaded
                state["step"] = state["step"].to(p.device, torch.float32)  # the kernel reads it there
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        steps, exp_avgs, exp_avg_sqs, *max_exp_avg_sqs = ([s[key] for s in states] for key in keys)
        buckets = []
        for device, positions in _common.device_positions(params, range(len(params))):
            bucket_params = _common.take(params, positions)
            buckets.append(AdamBucket(
                self._kernel("adam_step_", device, bucket_params),
                device,
                positions,
                bucket_params,
                _common.take(exp_avgs, positions),
                _common.take(exp_avg_sqs, positions),
                _common.take(max_exp_avg_sqs[0], positions) if amsgrad else [],
                _common.take(steps, positions),
                any(p.is_complex() for p in bucket_params),
            ))
        return buckets, PlannedState(states, keys, [s[key] for s in states for key in keys])

    def _init_group(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is not None:
                self._init_state(p, group["amsgrad"])

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            # torch.optim.Adam's state, key for key and dtype for dtype, so state_dicts move both ways.
            # On a GPU the step counter lives on the device, as in torch's fused Adam.
            state["step"] = (torch.tensor(0.0, dtype=torch.float32, device=p.device) if p.is_cuda
                             else torch.tensor(0.0, dtype=_common.step_dtype()))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _run_plan(self, group: dict, calls: list[AdamBucket], grads: list[Tensor]) -> None:
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        decoupled, amsgrad, maximize = group["decoupled_weight_decay"], group["amsgrad"], group["maximize"]
        beta1, beta2 = (_common.as_float(beta) for beta in group["betas"])
        for bucket in calls:
            grad_scale, found_inf = _common.amp_tensors(self, bucket.device)
            lr_value, lr_tensor = _common.lr_arguments(lr, bucket.device)
            updated = (bucket.params, _common.take(grads, bucket.positions), bucket.exp_avgs,
                       bucket.exp_avg_sqs, bucket.max_exp_avg_sqs)
            if bucket.has_complex:
                updated = map(_common.real_views, updated)
            bucket.kernel(*updated, bucket.steps, lr_value, beta1, beta2, eps, weight_decay,
                          decoupled, amsgrad, maximize, grad_scale, found_inf, lr_tensor)


class AdamW(Adam):
    """Drop-in for :class:`torch.optim.AdamW`: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, backend=backend,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
