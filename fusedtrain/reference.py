"""Plain-PyTorch versions of every fusedtrain op, written from the math.

They are the fallback when no native kernel can run, and the oracle the tests hold the kernels
to. Each has the signature and the in-place effect of its torch.ops.fusedtrain op. The math runs
in fp32 for 16-bit tensors (fp64 for fp64), and the result is rounded once into the storage dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# torch's reduction codes (torch.nn._reduction.get_enum), as the linear + MSE ops take them.
MEAN, SUM = 1, 2


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _skipped(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _lr_value(lr: float, lr_tensor: Tensor | None) -> float:
    return lr if lr_tensor is None else lr_tensor.item()


def _unscaled_grad(grad: Tensor, grad_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.item()
        grad.copy_(g)  # torch's fused optimizers leave the unscaled gradient behind
    return g


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lr_tensor: Tensor | None = None,
) -> None:
    """Adam (decoupled=False) or AdamW (decoupled=True), one step, in place; lr_tensor, when
    given, replaces lr.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  v_hat = max(v_hat, v) if amsgrad
    p <- p - lr / (1 - b1^t) * m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)
    with g += wd p (Adam) or p *= 1 - lr wd (AdamW) first.
    """
    if _skipped(found_inf):
        return
    lr = _lr_value(lr, lr_tensor)
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        steps[i] += 1
        t = steps[i].item()
        g = _unscaled_grad(grads[i], grad_scale, dtype)
        if maximize:
            g = -g
        p = param.to(dtype)
        if weight_decay != 0:
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = exp_avgs[i].to(dtype).lerp(g, 1 - beta1)
        v = exp_avg_sqs[i].to(dtype) * beta2 + (1 - beta2) * g * g
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            max_exp_avg_sqs[i].copy_(v_hat)
        step_size = lr / (1 - beta1**t)
        denom = v_hat.sqrt() / math.sqrt(1 - beta2**t) + eps
        param.copy_(p - step_size * m / denom)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lr_tensor: Tensor | None = None,
) -> None:
    """SGD, one step, in place: g += wd p; b <- g (first step) or momentum b + (1 - dampening) g;
    g <- g + momentum b (nesterov) or b; p <- p - lr g. lr_tensor, when given, replaces lr."""
    if _skipped(found_inf):
        return
    lr = _lr_value(lr, lr_tensor)
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        g = _unscaled_grad(grads[i], grad_scale, dtype)
        if maximize:
            g = -g
        p = param.to(dtype)
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            if first_step:
                buf = g
            else:
                buf = momentum_buffers[i].to(dtype) * momentum + (1 - dampening) * g
            momentum_buffers[i].copy_(buf)
            g = g + momentum * buf if nesterov else buf
        param.copy_(p - lr * g)


def linear_mse_fwd_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: int,
    need_grad_x: bool,
    need_grad_params: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear + MSE loss and its gradients (reduction: 1 mean, 2 sum; target (N, out)).

    r = x W^T + b - y;  loss = sum r^2 / R (R = r.numel() for mean, 1 for sum);
    g = 2 r / R;  grad_W = g^T x;  grad_b = sum_rows g;  grad_x = g W.
    Gradients not asked for are empty tensors, as in the op."""
    pred = x @ weight.T
    if bias is not None:
        pred = pred + bias
    r = pred - target
    count = r.numel() if reduction == MEAN else 1
    loss = (r * r).sum() / count
    g = r * 2.0 / count  # a tensor division: an empty batch gives NaN and empty gradients, as torch
    grad_weight = g.T @ x if need_grad_params else x.new_empty(0)
    grad_bias = g.sum(0) if need_grad_params and bias is not None else x.new_empty(0)
    grad_x = g @ weight if need_grad_x else x.new_empty(0)
    return loss, grad_weight, grad_bias, grad_x


def linear_mse_train_step_(
    x: Tensor,
    target: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    reduction: int,
    state: list[Tensor],
    adam: bool,
    lr: float,
    weight_decay: float,
    maximize: bool,
    beta1: float,
    beta2: float,
    eps: float,
    decoupled: bool,
    amsgrad: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first_step: bool,
) -> Tensor:
    """One training step of a linear layer on the MSE loss: linear_mse_fwd_bwd, then adam_step_
    (adam=True) or sgd_step_ on [weight, bias], in place; returns the loss before the update.
    state: see split_train_step_state."""
    params = [weight] if bias is None else [weight, bias]
    lists = split_train_step_state(state, len(params), adam, amsgrad, momentum)
    loss, grad_weight, grad_bias, _ = linear_mse_fwd_bwd(x, weight, bias, target, reduction, False)
    grads = [grad_weight] if bias is None else [grad_weight, grad_bias]
    if adam:
        adam_step_(params, grads, *lists, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                   maximize)
    else:
        sgd_step_(params, grads, *lists, lr, momentum, dampening, weight_decay, nesterov, maximize,
                  first_step)
    return loss


def split_train_step_state(state: list[Tensor], n_params: int, adam: bool, amsgrad: bool,
                           momentum: float) -> tuple[list[Tensor], ...]:
    """The optimizer op's state lists in linear_mse_train_step_'s one `state` list (the order of
    csrc/cpu/linear_mse_fit.h), one tensor per param (weight, then bias if any): for Adam
    (exp_avgs, exp_avg_sqs, max_exp_avg_sqs (empty unless amsgrad), steps); for SGD
    (momentum_buffers,), empty without momentum. A list of another length is refused."""
    n = n_params
    expected = ((4 if amsgrad else 3) * n if adam else (n if momentum != 0 else 0))
    if len(state) != expected:
        raise ValueError(f"linear_mse_train_step_: state has {len(state)} tensors, expected {expected}")
    if not adam:
        return (state,)
    steps_at = (3 if amsgrad else 2) * n
    return state[:n], state[n:2 * n], state[2 * n:steps_at], state[steps_at:]
