"""The op ``linear_mse_train_step_`` in Triton: one training step of a linear layer with an MSE
loss, composed of the Triton kernels of the other ops.

``linear_mse_train_step_`` has the signature and the in-place effect of the native op (schema in
csrc/ops.cpp): the loss and the gradients of weight and bias by linear_mse_fwd_bwd (tl.dot
tiles), then adam_step_ (adam=True) or sgd_step_ on [weight, bias] with the optimizer's state
tensors, ordered as in csrc/cpu/linear_mse_fit.h: for Adam exp_avgs, exp_avg_sqs,
max_exp_avg_sqs (amsgrad only) and steps, one of each per param; for SGD with momentum the
momentum buffers; nothing for SGD without. It returns the loss before the update.

Composed rather than fused into one kernel (as the native CUDA op is for small out): the
gradients (out * (in + 1) values) are small next to x, so the optimizer launch costs little next
to the pass over x. The argument checks all run before the first kernel, so a refused call
changes nothing. Nothing waits for the device: the step counts are read and incremented by the
kernels. Everything runs with the tensors' CUDA device current (the kernels launch on the
current device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedtrain.reference import split_train_step_state
from fusedtrain.triton._device import device_guard
from fusedtrain.triton.linear_mse import linear_mse_fwd_bwd
from fusedtrain.triton.optim import adam_step_, sgd_step_

_OP = "linear_mse_train_step_"


def _check_steps(steps: list[Tensor], first: int, device: torch.device) -> None:
    """Adam's step counts, state[first:], named by their place in `state`; adam_step_ and
    sgd_step_ check the rest (shapes, dtypes, devices) before they write anything, but
    linear_mse_fwd_bwd runs before them."""
    for i, step in enumerate(steps, start=first):
        if step.numel() != 1:
            raise ValueError(f"{_OP}: state[{i}] (a step count) must have one element, got "
                             f"shape {tuple(step.shape)}")
        if step.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{_OP}: state[{i}] (a step count) must be float32 or float64, "
                            f"got {step.dtype}")
        if step.device != device:
            raise ValueError(f"{_OP}: state[{i}] (a step count) is on {step.device} but weight "
                             f"is on {device}: the kernels read and increment it there")


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
    """One SGD or Adam/AdamW step of a linear layer on the MSE loss, in place; returns the loss
    before the update (0-dim, x's dtype). ``first_step``: SGD's momentum buffers are new and start
    as the first gradient."""
    params = [weight] if bias is None else [weight, bias]
    lists = split_train_step_state(state, len(params), adam, amsgrad, momentum)
    if adam:
        _check_steps(lists[-1], len(state) - len(params), weight.device)
    # weight and bias are written in place, outside autograd, as natively
    with torch.no_grad(), device_guard(weight.device):
        loss, grad_weight, grad_bias, _ = linear_mse_fwd_bwd(x, weight, bias, target, reduction,
                                                             False)
        grads = [grad_weight] if bias is None else [grad_weight, grad_bias]
        if adam:
            adam_step_(params, grads, *lists, lr, beta1, beta2, eps, weight_decay, decoupled,
                       amsgrad, maximize)
        else:
            sgd_step_(params, grads, *lists, lr, momentum, dampening, weight_decay, nesterov,
                      maximize, first_step)
    return loss
