"""Functional forms of the fused loss heads.

linear_mse_loss(x, weight, bias, target) == F.mse_loss(F.linear(x, weight, bias), target), with
the gradients computed in the same pass as the loss, so backward only scales them by
grad_output and the prediction is never stored.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fusedtrain import _dispatch, reference

_REDUCTIONS = {"mean": reference.MEAN, "sum": reference.SUM}
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _warn_target_size(input_size: torch.Size, target: Tensor) -> None:
    """torch.nn.functional.mse_loss's warning, word for word."""
    if target.size() != input_size:
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input_size}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )


def _linear_mse_op(x: Tensor, backend: str):
    if x.dtype not in _NATIVE_DTYPES:
        backend = "reference"  # the native kernels are fp32/fp64
    return _dispatch.op("linear_mse_fwd_bwd", backend, x.device)


class _LinearMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, reduction, backend):
        need_grad_x = ctx.needs_input_grad[0]
        need_grad_params = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        loss, grad_weight, grad_bias, grad_x = _linear_mse_op(x, backend)(
            x, weight, bias, target, reduction, need_grad_x, need_grad_params)
        ctx.save_for_backward(grad_x, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_weight, grad_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (grad_x * grad_output if needs[0] else None,
                grad_weight * grad_output if needs[1] else None,
                grad_bias * grad_output if needs[2] else None,
                None, None, None)


def _takes_stock_path(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                      reduction: str) -> bool:
    """Inputs the fused op does not take, or gains nothing on, which torch takes as they are:
    reduction "none", a 0-dim x or 1-D weight, a bias of another rank, non-float or mixed
    target dtypes, sparse tensors, empty tensors, and a target that needs a gradient."""
    tensors = (x, weight, target) if bias is None else (x, weight, bias, target)
    return (reduction == "none" or x.dim() == 0 or weight.dim() != 2
            or (bias is not None and bias.dim() != 1)
            or not x.is_floating_point() or target.dtype != x.dtype
            or any(t.layout != torch.strided for t in tensors)
            or x.numel() == 0 or weight.numel() == 0 or target.requires_grad)


def _checked_prediction_size(x: Tensor, weight: Tensor, bias: Tensor | None,
                             target: Tensor) -> torch.Size | None:
    """The prediction's size, after the checks that torch would fail with a RuntimeError, here
    with the argument named; None if the target broadcasts the prediction to a larger shape."""
    name = "linear_mse_loss"
    if weight.shape[1] != x.shape[-1]:
        raise RuntimeError(f"{name}: weight must have shape (out, {x.shape[-1]}) for x of shape "
                           f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise RuntimeError(f"{name}: bias must have shape ({weight.shape[0]},) for weight of shape "
                           f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    for label, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(f"{name}: {label} is {t.dtype} on {t.device} but x is {x.dtype} "
                               f"on {x.device}")
    pred_size = torch.Size((*x.shape[:-1], weight.shape[0]))
    try:
        broadcast = torch.broadcast_shapes(pred_size, target.shape)
    except RuntimeError:
        raise RuntimeError(f"{name}: target of shape {tuple(target.shape)} does not broadcast "
                           f"with the prediction's shape {tuple(pred_size)}") from None
    return pred_size if broadcast == pred_size else None


def linear_mse_loss(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                    reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """``F.mse_loss(F.linear(x, weight, bias), target, reduction=reduction)``, fused.

    Same shapes (x (*, in), weight (out, in), target broadcastable like mse_loss's), same
    warning, same result, and the same exception types, with the argument named. Targets that
    broadcast the prediction to a larger shape, reduction "none", a target of another dtype or
    that needs a gradient, and the rarer inputs of _takes_stock_path take the stock path, since
    the fused one has nothing to gain there.
    """
    if reduction not in (*_REDUCTIONS, "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if _takes_stock_path(x, weight, bias, target, reduction):
        return torch.nn.functional.mse_loss(
            torch.nn.functional.linear(x, weight, bias), target, reduction=reduction)
    pred_size = _checked_prediction_size(x, weight, bias, target)
    if pred_size is None:  # the target broadcasts the prediction to a larger shape
        return torch.nn.functional.mse_loss(
            torch.nn.functional.linear(x, weight, bias), target, reduction=reduction)
    _warn_target_size(pred_size, target)
    x2 = x.reshape(-1, x.shape[-1])
    target2 = target.expand(pred_size).reshape(-1, weight.shape[0])
    code = _REDUCTIONS[reduction]
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearMSE.apply(x2, weight, bias, target2, code, backend)
    # Nothing to differentiate: the loss alone, no gradient work.
    return _linear_mse_op(x2, backend)(x2, weight, bias, target2, code, False, False)[0]


class _MSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, reduction):
        diff = input - target  # reduction is "mean" or "sum" here
        scale = 2.0 / diff.numel() if reduction == "mean" else 2.0
        loss = torch.linalg.vecdot(diff.flatten(), diff.flatten()) * (scale / 2.0)
        grad = diff.mul_(scale)  # dloss/dinput, computed now; diff is not needed any more
        needs = ctx.needs_input_grad
        if needs[0] and grad.shape != input.shape:  # target broadcast the input: sum back
            grad_input = grad.sum_to_size(input.shape)
        else:
            grad_input = grad
        ctx.save_for_backward(grad_input if needs[0] else None,
                              grad.sum_to_size(target.shape) if needs[1] else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_target = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (grad_input * grad_output if needs[0] else None,
                -grad_target * grad_output if needs[1] else None,
                None)


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.mse_loss`` whose gradient is computed in the forward
    pass (backward only scales it by grad_output)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _warn_target_size(input.size(), target)
    grad_needed = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    if reduction == "none" or not grad_needed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already warned above, with the caller's line
            return torch.nn.functional.mse_loss(input, target, reduction=reduction)
    return _MSE.apply(input, target, reduction)
