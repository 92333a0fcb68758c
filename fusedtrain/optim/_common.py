"""What the fusedtrain optimizers share: argument checks that torch.optim makes too, the features
they do not support, and the validation of per-param state before a step mutates anything."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from fusedtrain import _dispatch
from fusedtrain.optim import _dtensor


def as_float(value: float | Tensor) -> float:
    """A hyperparameter that torch allows as a one-element tensor, as a Python float. Under
    torch.compile a tensor stays a tensor: .item() would break the graph, and the traced
    optimizer ops take their hyperparameters as a tensor anyway (see _dispatch)."""
    return value.item() if isinstance(value, Tensor) and not torch.compiler.is_compiling() else value


def as_scalar(value: float | Tensor) -> float | Tensor:
    """A hyperparameter as torch.optim keeps it: a one-element tensor as a 0-dim tensor (a
    differentiable step takes gradients through it), a number as it is."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


def check_lr(lr: float | Tensor) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def lr_arguments(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """The (lr, lr_tensor) pair of an optimizer op. A tensor lr on an accelerator stays a tensor,
    read by the kernel, so a step recorded by CUDA graph capture follows later changes to it (and
    reading it on the host would wait for the device); the float is then ignored. A CPU one is
    read here, for free (under torch.compile by the traced op, see as_float)."""
    if isinstance(lr, Tensor) and lr.device.type != "cpu":
        return 0.0, lr.to(device)
    return as_float(lr), None


def check_flags(foreach: bool | None, fused: bool | None, differentiable: bool, backend: str) -> None:
    """torch.optim's refusals of impossible implementation flags (differentiable=True itself is
    taken: such a group is stepped by torch's for-loop, see _torch_loop), and the backend."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    _dispatch.check_backend(backend)


def params_with_grad(optimizer: str, group: dict, takes_sparse: bool) -> tuple[list[Tensor], bool]:
    """The params of `group` that have a gradient, and whether one of those is sparse; an
    optimizer that does not take sparse gradients refuses them as torch does."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            if takes_sparse:
                return params, True
            raise RuntimeError(f"{optimizer} does not support sparse gradients, please consider "
                               "SparseAdam instead")
    return params, False


def real_views(tensors: list[Tensor]) -> list[Tensor]:
    """`tensors` with each complex one as a real view with a last dimension of 2 (real,
    imaginary): torch.optim updates complex params, grads and state this way (_view_as_real), and
    the elementwise kernels then update them as pairs of reals, state staying complex."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def existing_states(optimizer: torch.optim.Optimizer, group_index: int, group: dict):
    """(description, param, state) for the params of a group that have a gradient and state."""
    for index, p in enumerate(group["params"]):
        state = optimizer.state.get(p)
        if p.grad is not None and state:
            yield f"param {index} of param group {group_index}", p, state


def step_dtype() -> torch.dtype:
    """The dtype of torch.optim's (non-capturable) 'step' state tensors."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_state_tensor(optimizer: str, state: dict, key: str, param: Tensor, where: str) -> None:
    """A state tensor that is updated element by element with `param` must match it exactly:
    a state_dict of another model loads without complaint in torch.optim, and fails here, before
    the step, with the key and the param named."""
    if key not in state:
        raise RuntimeError(f"{optimizer}: state of {where} has no '{key}'")
    value = state[key]
    if not isinstance(value, Tensor):
        raise RuntimeError(f"{optimizer}: state['{key}'] of {where} must be a Tensor, got {type(value).__name__}")
    if value.shape != param.shape:
        raise RuntimeError(
            f"{optimizer}: state['{key}'] of {where} has shape {tuple(value.shape)} but the param "
            f"has shape {tuple(param.shape)}; was the state_dict loaded from another model?"
        )
    if value.dtype != param.dtype or value.device != param.device:
        raise RuntimeError(
            f"{optimizer}: state['{key}'] of {where} is {value.dtype} on {value.device} but the "
            f"param is {param.dtype} on {param.device}"
        )
    _dtensor.check_state_layout(optimizer, value, key, param, where)


def check_step_tensor(optimizer: str, state: dict, where: str) -> None:
    step = state.get("step")
    if not isinstance(step, Tensor) or step.numel() != 1 or step.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"{optimizer}: state['step'] of {where} must be a one-element float32 or float64 tensor, "
            f"got {step!r}"
        )


def device_positions(params: list[Tensor], positions: list[int]) -> list[tuple[torch.device, list[int] | None]]:
    """The kernel calls that update params[i] for i in `positions` (ascending): one per device,
    with the positions it takes, or None for the common call that takes all of `params` in order
    (a step then hands it its lists as they are)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i in positions:
        by_device[params[i].device].append(i)
    everything = len(by_device) == 1 and len(positions) == len(params)
    return [(device, None if everything else taken) for device, taken in by_device.items()]


def take(values: list, positions: list[int] | None) -> list:
    """values[i] for i in positions (see device_positions); all of them for None."""
    return values if positions is None else [values[i] for i in positions]


def amp_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """grad_scale and found_inf that torch.amp.GradScaler hands to optimizers which, like
    torch's fused ones, unscale and skip inside the step (_step_supports_amp_scaling)."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device)
    if found_inf is not None:
        found_inf = found_inf.to(device)
    return grad_scale, found_inf
