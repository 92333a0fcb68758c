"""Plain-PyTorch versions of every fusedtrain op, written from the math.

They are the fallback when no native kernel can run, and the oracle the tests hold the kernels
to. Each has the signature and the in-place effect of its torch.ops.fusedtrain op. The math runs
in fp32 for 16-bit tensors (fp64 for fp64), and the result is rounded once into the storage dtype.
"""

from __future__ import annotations

import enum
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


# ---------------------------------------------------------------------------------------------
# Layer stacks: nn.Linear layers, each optionally followed by one elementwise activation, and a
# loss head. fusedtrain.stacks describes a model as these codes; csrc/stack_spec.h holds the same.

class Activation(enum.IntEnum):
    """The activation after a layer, as the stack ops take it (IDENTITY: none)."""

    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2  # activation_param: negative_slope
    TANH = 3
    SIGMOID = 4
    GELU = 5  # approximate="none"
    GELU_TANH = 6  # approximate="tanh"
    SILU = 7


class Loss(enum.IntEnum):
    """The loss head, as the stack ops take it."""

    MSE = 0
    L1 = 1
    SMOOTH_L1 = 2  # loss_param: beta
    HUBER = 3  # loss_param: delta
    CROSS_ENTROPY = 4  # class-index targets; ignore_index, label_smoothing
    BCE_WITH_LOGITS = 5


def _stack_layers(params: list[Tensor], has_bias: list[bool], layer_params: list[int],
                  activations: list[int], activation_params: list[float], loss: int,
                  reduction: int) -> list[tuple[Tensor, Tensor | None]]:
    """(weight, bias or None) of each layer, after checking that the spec's lists fit together."""
    depth = len(has_bias)
    for name, values in (("layer_params", layer_params), ("activations", activations),
                         ("activation_params", activation_params)):
        if len(values) != depth:
            raise ValueError(f"stack: {name} has {len(values)} entries for {depth} layers")
    if depth == 0:
        raise ValueError("stack: a stack has at least one layer")
    unknown = [a for a in activations if a not in frozenset(Activation)]
    if unknown:
        raise ValueError(f"stack: activations holds {unknown[0]}, not an Activation code")
    if loss not in frozenset(Loss):
        raise ValueError(f"stack: loss is {loss}, not a Loss code")
    if reduction not in (MEAN, SUM):
        raise ValueError(f"stack: reduction must be {MEAN} (mean) or {SUM} (sum), got {reduction}")
    layers, role = [], {}  # role: param index -> (weight or bias, of the layer at index)
    for index, bias in zip(layer_params, has_bias):
        if not 0 <= index < len(params) - bias:
            raise ValueError(f"stack: layer_params holds {index}, outside the {len(params)} params")
        for offset, kind in enumerate(("weight", "bias")[:1 + bias]):
            if role.setdefault(index + offset, (kind, index)) != (kind, index):
                raise ValueError(f"stack: layer_params gives params[{index + offset}] two roles")
        layers.append((params[index], params[index + 1] if bias else None))
    if len(role) != len(params):
        raise ValueError(f"stack: the layers use {len(role)} of the {len(params)} params")
    return layers


def _activation(code: int, param: float, z: Tensor) -> Tensor:
    """act(z) for the activation `code`."""
    if code == Activation.IDENTITY:
        return z
    if code == Activation.RELU:
        return torch.relu(z)
    if code == Activation.LEAKY_RELU:
        return torch.where(z > 0, z, z * param)
    if code == Activation.TANH:
        return torch.tanh(z)
    if code == Activation.SIGMOID:
        return torch.sigmoid(z)
    if code == Activation.GELU:
        return 0.5 * z * (1 + torch.erf(z * math.sqrt(0.5)))  # z Phi(z)
    if code == Activation.GELU_TANH:
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z * z * z)))
    return z * torch.sigmoid(z)  # SILU


def _activation_backward(code: int, param: float, g: Tensor, z: Tensor, h: Tensor) -> Tensor:
    """dL/dz = dL/dh * act'(z), given z and h = act(z); each derivative with torch's conventions
    at its kinks, so that the gradients agree with autograd's bit for bit in the branches."""
    if code == Activation.IDENTITY:
        return g
    if code == Activation.RELU:
        # 1 where h > 0; at z == 0 the derivative is 0 (torch's threshold_backward passes the
        # gradient unless h <= 0, which also passes it for a NaN).
        return torch.where(h <= 0, 0, g)
    if code == Activation.LEAKY_RELU:
        return torch.where(z > 0, g, g * param)  # negative_slope at z == 0, as torch
    if code == Activation.TANH:
        return g * (1 - h * h)  # tanh' = 1 - tanh^2, from the output
    if code == Activation.SIGMOID:
        return g * (1 - h) * h  # s' = s (1 - s), from the output
    if code == Activation.GELU:
        # d/dz [z Phi(z)] = Phi(z) + z phi(z), phi the standard normal density.
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return g * (cdf + z * pdf)
    if code == Activation.GELU_TANH:
        # h = 0.5 z (1 + tanh(u)), u = k (z + c z^3):
        # h' = 0.5 (1 + tanh(u)) + 0.5 z (1 - tanh(u)^2) k (1 + 3 c z^2), torch's formula.
        k, c = math.sqrt(2 / math.pi), 0.044715
        tanh_u = torch.tanh(k * (z + c * z * z * z))
        return g * (0.5 * (1 + tanh_u) + 0.5 * z * (1 - tanh_u * tanh_u) * k * (1 + 3 * c * z * z))
    # SILU: h = z s(z), h' = s + z s (1 - s) = s (1 + z (1 - s)).
    s = torch.sigmoid(z)
    return g * s * (1 + z * (1 - s))


def _stack_loss(loss: int, reduction: int, loss_param: float, ignore_index: int,
                label_smoothing: float, pred: Tensor, target: Tensor,
                need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The loss of the prediction (N, out) and dL/dpred (None unless need_grad).

    Elementwise losses are sum_e l(r_e) / R with r = pred - target and R = N out for mean, 1
    for sum (a tensor division: an empty batch gives a NaN mean, as torch)."""
    if loss == Loss.CROSS_ENTROPY:
        return _cross_entropy(reduction, ignore_index, label_smoothing, pred, target, need_grad)
    count = pred.numel() if reduction == MEAN else 1
    grad = None
    if loss == Loss.BCE_WITH_LOGITS:
        # l = -y log s(z) - (1 - y) log(1 - s(z)) = max(z, 0) - z y + log(1 + exp(-|z|)), stable
        # for every z; dl/dz = s(z) - y, the sigmoid fused into the gradient.
        z, y = pred, target
        value = (z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).sum() / count
        if need_grad:
            grad = (torch.sigmoid(z) - y) / count
        return value, grad
    r = pred - target
    if loss == Loss.MSE:
        value = (r * r).sum()  # l = r^2, l' = 2 r
        if need_grad:
            grad = 2 * r
    elif loss == Loss.L1 or (loss == Loss.SMOOTH_L1 and loss_param == 0):
        # l = |r|, l' = sign(r) with sign(0) = 0 (and 0 for a NaN), torch's abs backward.
        # SmoothL1 with beta = 0 is L1: torch's smooth_l1_loss calls l1_loss then.
        value = r.abs().sum()
        if need_grad:
            grad = torch.sign(r)
    elif loss == Loss.SMOOTH_L1:
        # l = r^2 / (2 beta) where |r| < beta, else |r| - beta / 2; l' = r / beta inside,
        # sign(r) outside: continuous at |r| == beta. torch's branch order (r < -beta, r > beta,
        # else r / beta), so a NaN r gives a NaN gradient as there.
        beta = loss_param
        a = r.abs()
        value = torch.where(a < beta, 0.5 * r * r / beta, a - 0.5 * beta).sum()
        if need_grad:
            grad = torch.where(r < -beta, -1.0, torch.where(r > beta, 1.0, r / beta))
    else:  # HUBER
        # l = r^2 / 2 where |r| < delta, else delta (|r| - delta / 2); l' = r inside, delta
        # sign(r) outside: continuous at |r| == delta; torch's branch order as for SmoothL1.
        delta = loss_param
        a = r.abs()
        value = torch.where(a < delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()
        if need_grad:
            grad = torch.where(r < -delta, -delta, torch.where(r > delta, delta, r))
    return value / count, (grad / count if need_grad else None)


def _cross_entropy(reduction: int, ignore_index: int, label_smoothing: float, z: Tensor,
                   target: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Cross entropy of logits z (N, C) against class indices (N,), as nn.CrossEntropyLoss.

    With log p = log_softmax(z) and the smoothed target q = (1 - ls) onehot(y) + ls / C, a row's
    loss is -sum_c q_c log p_c = (1 - ls) (-log p_y) + (ls / C) (-sum_c log p_c) (torch's split),
    and since sum_c q_c = 1, its gradient is dl/dz_k = p_k - q_k: the softmax fused into the
    gradient. Rows whose target is ignore_index count for nothing; the mean divides by the
    number of the other rows (all ignored: 0 / 0, a NaN loss and zero gradients, as torch)."""
    n_classes = z.shape[1]
    kept = target != ignore_index
    y = torch.where(kept, target, 0).unsqueeze(1)  # any class for the ignored rows: masked below
    shifted = z - z.amax(1, keepdim=True)  # log_softmax without overflow
    log_p = shifted - torch.log(torch.exp(shifted).sum(1, keepdim=True))
    row = -log_p.gather(1, y).squeeze(1)
    if label_smoothing != 0:
        row = (1 - label_smoothing) * row - (label_smoothing / n_classes) * log_p.sum(1)
    count = kept.sum() if reduction == MEAN else 1
    value = torch.where(kept, row, 0).sum() / count
    if not need_grad:
        return value, None
    q = torch.full_like(z, label_smoothing / n_classes).scatter_add_(
        1, y, torch.full_like(row, 1 - label_smoothing).unsqueeze(1))
    grad = torch.where(kept.unsqueeze(1), (torch.exp(log_p) - q) / count, 0)
    return value, grad


@torch.no_grad()
def stack_fwd_bwd(x: Tensor, target: Tensor, params: list[Tensor], has_bias: list[bool],
                  layer_params: list[int], activations: list[int], activation_params: list[float],
                  loss: int, reduction: int, loss_param: float, ignore_index: int,
                  label_smoothing: float, need_grads: bool = True) -> tuple[Tensor, list[Tensor]]:
    """The loss of a layer stack on (x, target) and the gradient of every param (in the order of
    params; [] unless need_grads), from the math, without autograd. Math in x's dtype.

    The arguments after params are a fusedtrain.stacks.StackSpec: layer l has weight
    params[layer_params[l]] and, if has_bias[l], bias params[layer_params[l] + 1]; a layer used
    twice has its gradients summed. Forward keeping each layer's input h_{l-1}, pre-activation
    z_l = h_{l-1} W_l^T + b_l and output h_l = act_l(z_l); the loss gradient g = dL/dh_L;
    then down the layers: dz = g act_l'(z_l); grad W_l += dz^T h_{l-1}; grad b_l += sum_rows dz;
    g = dz W_l (for the layer below)."""
    layers = _stack_layers(params, has_bias, layer_params, activations, activation_params, loss,
                           reduction)
    h = x
    saved = []  # (h_{l-1}, z_l, h_l) per layer
    for (weight, bias), code, param in zip(layers, activations, activation_params):
        z = h @ weight.T
        if bias is not None:
            z = z + bias
        h_next = _activation(code, param, z)
        saved.append((h, z, h_next))
        h = h_next
    value, g = _stack_loss(loss, reduction, loss_param, ignore_index, label_smoothing, h, target,
                           need_grads)
    if not need_grads:
        return value, []
    grads = [torch.zeros_like(p) for p in params]
    for l in reversed(range(len(layers))):
        weight, bias = layers[l]
        h_in, z, h_out = saved[l]
        dz = _activation_backward(activations[l], activation_params[l], g, z, h_out)
        grads[layer_params[l]] += dz.T @ h_in
        if bias is not None:
            grads[layer_params[l] + 1] += dz.sum(0)
        if l > 0:
            g = dz @ weight
    return value, grads


@torch.no_grad()
def stack_adam_step_(x: Tensor, target: Tensor, params: list[Tensor], has_bias: list[bool],
                     layer_params: list[int], activations: list[int],
                     activation_params: list[float], loss: int, reduction: int, loss_param: float,
                     ignore_index: int, label_smoothing: float, exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor],
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     decoupled: bool, amsgrad: bool, maximize: bool,
                     lr_tensor: Tensor | None = None) -> Tensor:
    """One training step of a layer stack with Adam/AdamW: stack_fwd_bwd, then adam_step_ on
    (params, their gradients), in place; returns the loss before the update."""
    value, grads = stack_fwd_bwd(x, target, params, has_bias, layer_params, activations,
                                 activation_params, loss, reduction, loss_param, ignore_index,
                                 label_smoothing)
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
               weight_decay, decoupled, amsgrad, maximize, lr_tensor=lr_tensor)
    return value


@torch.no_grad()
def stack_sgd_step_(x: Tensor, target: Tensor, params: list[Tensor], has_bias: list[bool],
                    layer_params: list[int], activations: list[int],
                    activation_params: list[float], loss: int, reduction: int, loss_param: float,
                    ignore_index: int, label_smoothing: float, momentum_buffers: list[Tensor],
                    lr: float, momentum: float, dampening: float, weight_decay: float,
                    nesterov: bool, maximize: bool, first_step: bool,
                    lr_tensor: Tensor | None = None) -> Tensor:
    """One training step of a layer stack with SGD: stack_fwd_bwd, then sgd_step_ on (params,
    their gradients), in place; returns the loss before the update."""
    value, grads = stack_fwd_bwd(x, target, params, has_bias, layer_params, activations,
                                 activation_params, loss, reduction, loss_param, ignore_index,
                                 label_smoothing)
    sgd_step_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
              maximize, first_step, lr_tensor=lr_tensor)
    return value
