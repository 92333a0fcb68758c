"""The param groups that torch.optim's own for-loop steps instead of a fused kernel, with torch's
functional math (torch.optim.adam.adam, torch.optim.sgd.sgd, foreach=False), so they do exactly
what the stock optimizer does:

- differentiable=True: the update records autograd history (a kernel writes in place, unseen by
  autograd), so gradients flow through step() into params, state and tensor hyperparameters;
- SGD with a sparse gradient: torch adds it to the param, and keeps a sparse momentum buffer;
- a param listed twice in a group (torch warns that this will become an error): the for-loop
  updates it once per listing, one after the other, where kernel calls would race on it.

These are the rare cases, so nothing here is cached: state is read from optimizer.state at every
step, and a step here drops the group's cached plan, whose buffers this step may have replaced.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

# The text of torch's error for a sparse gradient with weight decay (torch.optim.SGD fails in
# grad.add(param)); raised here before anything moves, with the param named after it.
SPARSE_WEIGHT_DECAY_ERROR = "add(sparse, dense) is not supported. Use add(dense, sparse) instead."


def check_adam(optimizer: torch.optim.Optimizer, group_index: int, group: dict) -> None:
    """What torch.optim.Adam refuses in this group, before any group is stepped."""
    if not group["differentiable"]:
        return
    for p in group["params"]:
        state = optimizer.state.get(p)
        if p.grad is not None and state and state["step"].requires_grad:
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")


def check_sgd(optimizer: torch.optim.Optimizer, group_index: int, group: dict) -> None:
    """What torch.optim.SGD refuses in this group, before any group is stepped: a sparse gradient
    with weight decay (torch's for-loop) or with fused=True (torch's fused kernel)."""
    for index, p in enumerate(group["params"]):
        if p.grad is None or not p.grad.is_sparse:
            continue
        if group["fused"]:
            raise RuntimeError("`_fused_sgd` does not support sparse gradients")
        if group["weight_decay"] != 0:
            raise RuntimeError(f"{SPARSE_WEIGHT_DECAY_ERROR} (SGD: param {index} of param group "
                               f"{group_index} has a sparse gradient and weight_decay is "
                               f"{group['weight_decay']})")


def step_adam(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """One step of an Adam/AdamW group by torch.optim.adam.adam's for-loop. State is created as
    the fused path creates it (torch's keys and dtypes), so a group can switch paths."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = _unscaled_grads(optimizer, params)
    if grads is None:
        return
    states = [optimizer._init_state(p, group["amsgrad"]) for p in params]
    beta1, beta2 = group["betas"]
    torch_adam(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
        [s["step"] for s in states],
        foreach=False,
        capturable=False,
        differentiable=group["differentiable"],
        fused=False,
        has_complex=any(torch.is_complex(p) for p in params),
        decoupled_weight_decay=group["decoupled_weight_decay"],
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


def step_sgd(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """One step of an SGD group by torch.optim.sgd.sgd's for-loop; new momentum buffers are
    stored as torch stores them (the last listing of a param listed twice wins, as in torch)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = _unscaled_grads(optimizer, params)
    if grads is None:
        return
    with_momentum = group["momentum"] != 0
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params] if with_momentum else []
    torch_sgd(
        params,
        grads,
        buffers,
        has_sparse_grad=any(g.is_sparse for g in grads),
        foreach=False,
        fused=False,
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    for p, buffer in zip(params, buffers):
        optimizer.state[p]["momentum_buffer"] = buffer


def _unscaled_grads(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor] | None:
    """The gradients of `params`, or None if torch.amp.GradScaler found an inf this step.

    The fusedtrain optimizers take GradScaler's grad_scale and found_inf into the step (as torch's
    fused ones do), so GradScaler does not unscale for them; torch's for-loop takes neither, so
    this does what the kernels do: skip on found_inf, else unscale the gradients in place."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and found_inf.item() != 0:
        return None
    grads = [p.grad for p in params]
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        scale = grad_scale.item()
        with torch.no_grad():
            for g in {id(g): g for g in grads}.values():  # once each: a param may be listed twice
                g.div_(scale)
    return grads
