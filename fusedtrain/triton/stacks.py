"""The layer-stack ops in Triton: ``stack_fwd_bwd``, ``stack_adam_step_`` and ``stack_sgd_step_``.

Each has the signature, the results and the in-place effects of its native op (schemas in
csrc/ops.cpp; the oracle is fusedtrain.reference): x (N, in), the target, the params (each
layer's weight (out, in) and, if it has one, its bias (out), by layer_params), then the stack's
description (the fields of fusedtrain.stacks.StackSpec), then for a train step the optimizer's
state lists and hyperparameters, lr_tensor last. The math, layer l with input h_{l-1} (h_0 = x):

    forward   z_l = h_{l-1} W_l^T + b_l          h_l = act_l(z_l)
    loss      L = loss(h_L, target)              dz_L = dL/dh_L * act_L'(z_L)
    backward  grad W_l += dz_l^T h_{l-1}         grad b_l += sum over rows of dz_l
              dz_{l-1} = (dz_l W_l) * act_{l-1}'(z_{l-1})

Kernels (every grid flattened onto axis 0, tiles as in fusedtrain.triton.linear_mse, whose
tiling and weight-gradient kernel they share; the forward and backward-input kernels build on
fusedtrain.triton._tile_dot's tile product, as linear_mse's forward and grad_x kernels do):

* _layer_forward_kernel, per layer, one program per (row block, out block): the tile of z by
  tl.dot over slices of `in`, then the bias and the activation in the epilogue; it stores h_l
  and, only for the activations whose derivative needs the pre-activation (LeakyReLU, GELU,
  SiLU), z_l. ReLU, Tanh and Sigmoid differentiate from their output h_l, Identity needs
  nothing: one (N, out) buffer per layer for them.
* _loss_kernel, one program per row block, looping over the output's column blocks: the loss's
  partial sum and dz_L in one pass, the last activation's derivative applied there. Cross entropy
  takes two passes over its row block's logits: an online max and sum of exponentials (and the
  target's logit, the sum of the logits for label smoothing), then p - q per column, the softmax
  never stored; BCE-with-logits fuses the sigmoid the same way.
* linear_mse._grad_params_kernel, per layer: grad W = dz^T h_{l-1} by tl.dot, grad b as a column
  sum, the rows split over programs (summed by torch.sum) when the tiles are few. A layer whose
  params another layer also uses (an nn.Linear applied twice) adds its gradients to theirs.
* _backward_input_kernel, per layer but the first: dz_{l-1} = (dz_l W_l) * act_{l-1}'(.) by
  tl.dot over slices of out_l, the derivative in the epilogue.

Then the Triton optimizer kernels (fusedtrain.triton.optim.adam_step_ / sgd_step_) update every
param with its gradient: the update is the code of those ops. Depth 1 without activation under
MSE runs linear_mse_fwd_bwd's kernels instead, whose forward takes the loss and its gradient in
its epilogue: one launch and one (N, out) buffer fewer, and nothing stored for the loss alone.

Everything runs on x's device, with it current, in x's dtype (fp32 or fp64; fp32 products by
tl.dot's "ieee" precision, no TF32), and nothing waits for the device: the loss is a 0-dim
device tensor (the programs' partial sums added by torch.sum in fp64, divided by the count), the
floats of the description travel in one float64 table copied without waiting (Triton would pass
Python floats as fp32), cross entropy's count of kept rows is summed on the device, and Adam's
step counts are read and incremented by the optimizer kernels. Every check runs before the
first kernel, with the native ops' messages and exception types, so a refused call changes
nothing. One exception: cross entropy's class indices are checked against the class count on
the CPU only; on CUDA that check would wait for the device (torch's own kernels assert on the
device instead). The kernels compare each class index with the column indices and never
address memory by it, so an index out of range cannot reach outside a tensor; the API
(fusedtrain.stacks.prepare_target) checks the classes before it calls an op.

Transcendental functions: Triton's libdevice has no interpreter implementation, so tanh is
written from tl.exp, as (1 - e) / (1 + e) with e = exp(-2|z|) <= 1 (no overflow for any z;
near 0 its error is a few ulps absolute rather than relative), log(1 + e) likewise; erf is
tl.erf. Constants that are not exact in fp32 are built in the compute dtype (_constant).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedtrain.reference import MEAN, SUM, Activation, Loss
from fusedtrain.triton import linear_mse
from fusedtrain.triton._device import device_guard, host_table
from fusedtrain.triton._tile_dot import program_tile_dot
from fusedtrain.triton.optim import adam_step_ as _adam_step
from fusedtrain.triton.optim import sgd_step_ as _sgd_step

_NUM_WARPS = 4
_OPTIONS = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)
_COMPUTE_DTYPES = (torch.float32, torch.float64)
# Activations whose derivative is computed from the pre-activation z (the others from h = act(z)).
_DERIVATIVE_FROM_Z = (Activation.LEAKY_RELU, Activation.GELU, Activation.GELU_TANH,
                      Activation.SILU)

# The activation and loss codes as kernel constants.
_IDENTITY = tl.constexpr(int(Activation.IDENTITY))
_RELU = tl.constexpr(int(Activation.RELU))
_LEAKY_RELU = tl.constexpr(int(Activation.LEAKY_RELU))
_TANH = tl.constexpr(int(Activation.TANH))
_SIGMOID = tl.constexpr(int(Activation.SIGMOID))
_GELU = tl.constexpr(int(Activation.GELU))
_GELU_TANH = tl.constexpr(int(Activation.GELU_TANH))
_MSE = tl.constexpr(int(Loss.MSE))
_L1 = tl.constexpr(int(Loss.L1))
_SMOOTH_L1 = tl.constexpr(int(Loss.SMOOTH_L1))
_HUBER = tl.constexpr(int(Loss.HUBER))
_CROSS_ENTROPY = tl.constexpr(int(Loss.CROSS_ENTROPY))
_BCE_WITH_LOGITS = tl.constexpr(int(Loss.BCE_WITH_LOGITS))
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_CUBIC = tl.constexpr(0.044715)


# ---- Element math (the formulas and torch's conventions at the kinks: fusedtrain.reference's
# _activation, _activation_backward and _stack_loss) -------------------------------------------


@triton.jit
def _constant(value: tl.constexpr, DTYPE: tl.constexpr):
    """`value` rounded once to DTYPE (a bare float literal may pass through fp32 first)."""
    return tl.full((), value, DTYPE)


@triton.jit
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _activation(z, slope, ACTIVATION: tl.constexpr):
    """act(z); slope: LeakyReLU's negative_slope."""
    DTYPE: tl.constexpr = z.dtype
    if ACTIVATION == _RELU:
        return tl.where(z < 0, 0.0, z)  # a NaN passes, as torch.relu
    elif ACTIVATION == _LEAKY_RELU:
        return tl.where(z > 0, z, z * slope)
    elif ACTIVATION == _TANH:
        return _tanh(z)
    elif ACTIVATION == _SIGMOID:
        return tl.sigmoid(z)
    elif ACTIVATION == _GELU:
        return 0.5 * z * (1.0 + tl.erf(z * _constant(_SQRT_HALF, DTYPE)))
    elif ACTIVATION == _GELU_TANH:
        cubic = _constant(_GELU_TANH_CUBIC, DTYPE)
        return 0.5 * z * (1.0 + _tanh(_constant(_SQRT_2_OVER_PI, DTYPE) * (z + cubic * z * z * z)))
    elif ACTIVATION == _IDENTITY:
        return z
    else:  # SILU
        return z * tl.sigmoid(z)


@triton.jit
def _activation_backward(g, saved, slope, ACTIVATION: tl.constexpr):
    """dL/dz = g act'(z) from `saved`: z for the activations of _DERIVATIVE_FROM_Z, h = act(z)
    for the others (unused for Identity)."""
    DTYPE: tl.constexpr = g.dtype
    if ACTIVATION == _RELU:
        return tl.where(saved <= 0, 0.0, g)  # h <= 0: 0, also at z == 0, as torch
    elif ACTIVATION == _LEAKY_RELU:
        return tl.where(saved > 0, g, g * slope)  # negative_slope at z == 0, as torch
    elif ACTIVATION == _TANH:
        return g * (1.0 - saved * saved)
    elif ACTIVATION == _SIGMOID:
        return g * (1.0 - saved) * saved
    elif ACTIVATION == _GELU:
        # d/dz [z Phi(z)] = Phi(z) + z phi(z)
        cdf = 0.5 * (1.0 + tl.erf(saved * _constant(_SQRT_HALF, DTYPE)))
        pdf = tl.exp(-0.5 * saved * saved) * _constant(_INV_SQRT_2PI, DTYPE)
        return g * (cdf + saved * pdf)
    elif ACTIVATION == _GELU_TANH:
        # h = 0.5 z (1 + tanh(u)), u = k (z + c z^3):
        # h' = 0.5 (1 + tanh(u)) + 0.5 z (1 - tanh(u)^2) k (1 + 3 c z^2)
        k = _constant(_SQRT_2_OVER_PI, DTYPE)
        c = _constant(_GELU_TANH_CUBIC, DTYPE)
        tanh_u = _tanh(k * (saved + c * saved * saved * saved))
        return g * (0.5 * (1.0 + tanh_u)
                    + 0.5 * saved * (1.0 - tanh_u * tanh_u) * k * (1.0 + 3.0 * c * saved * saved))
    elif ACTIVATION == _IDENTITY:
        return g
    else:  # SILU: h' = s (1 + z (1 - s)), s = sigmoid(z)
        s = tl.sigmoid(saved)
        return g * s * (1.0 + saved * (1.0 - s))


@triton.jit
def _elementwise_loss(pred, y, loss_param, LOSS: tl.constexpr):
    """(l, dl/dpred) of each element (SmoothL1 with beta 0 comes here as L1)."""
    if LOSS == _BCE_WITH_LOGITS:
        # max(z, 0) - z y + log(1 + exp(-|z|)): stable for every z; dl/dz = sigmoid(z) - y
        value = tl.where(pred > 0, pred, 0.0) - pred * y + tl.log(1.0 + tl.exp(-tl.abs(pred)))
        grad = tl.sigmoid(pred) - y
    else:
        r = pred - y
        if LOSS == _MSE:
            value = r * r
            grad = 2.0 * r
        elif LOSS == _L1:
            value = tl.abs(r)
            grad = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, r * 0.0))  # torch.sign: NaN stays
        elif LOSS == _SMOOTH_L1:
            beta = loss_param
            a = tl.abs(r)
            value = tl.where(a < beta, 0.5 * r * r / beta, a - 0.5 * beta)
            grad = tl.where(r < -beta, -1.0, tl.where(r > beta, 1.0, r / beta))
        else:  # HUBER
            delta = loss_param
            a = tl.abs(r)
            value = tl.where(a < delta, 0.5 * r * r, delta * (a - 0.5 * delta))
            grad = tl.where(r < -delta, -delta, tl.where(r > delta, delta, r))
    return value, grad


# ---- Kernels ---------------------------------------------------------------------------------


@triton.jit
def _layer_forward_kernel(h_ptr, w_ptr, b_ptr, z_ptr, out_ptr, slope_ptr,
                          n, n_in, n_out, stride_hn, stride_hk,
                          HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # z = h @ W^T + b, out = act(z) for this program's (row block, out block); W contiguous.
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    z, rows, cols, row_mask, col_mask = program_tile_dot(
        h_ptr, w_ptr, n, n_in, n_out, stride_hn, stride_hk, 1, n_in,
        DTYPE, BLOCK_ROWS=BLOCK_N, BLOCK_INNER=BLOCK_K, BLOCK_COLS=BLOCK_O)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + cols, mask=col_mask, other=0.0)[None, :]

    mask = row_mask[:, None] & col_mask[None, :]
    tile = rows[:, None] * n_out + cols[None, :]
    slope = tl.load(slope_ptr).to(DTYPE)
    tl.store(out_ptr + tile, _activation(z, slope, ACTIVATION), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + tile, z, mask=mask)


@triton.jit
def _loss_kernel(pred_ptr, saved_ptr, y_ptr, dz_ptr, partial_ptr, count_ptr, floats_ptr,
                 n, n_out, stride_yn, stride_yo, ignore_index,
                 LOSS: tl.constexpr, ACTIVATION: tl.constexpr, NEED_GRAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
    # This row block's share of the loss (its partial sum), and dz = dL/dpred * act'(.) of the
    # last layer. pred, saved, dz: contiguous (n, n_out); y: (n, n_out) by its strides, or (n,)
    # class indices for cross entropy. floats: the last layer's negative_slope, loss_param,
    # label_smoothing; count: the loss's divisor (float64).
    DTYPE: tl.constexpr = pred_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    cs = tl.arange(0, BLOCK_O).to(tl.int64)
    slope = tl.load(floats_ptr).to(DTYPE)
    loss_param = tl.load(floats_ptr + 1).to(DTYPE)
    # Divided in fp64, rounded once. The count is 0 only when cross entropy keeps no row, and
    # then no gradient uses it.
    count = tl.load(count_ptr)
    inv_count = (1.0 / tl.where(count == 0, 1.0, count)).to(DTYPE)
    loss_sum = tl.zeros((BLOCK_N,), dtype=DTYPE)

    if LOSS == _CROSS_ENTROPY:
        # A row's loss is lse - z_y with lse = log sum_c exp(z_c); with label smoothing ls,
        # (1 - ls)(lse - z_y) + ls (lse - sum_c z_c / C); dl/dz_c = p_c - q_c with p = softmax(z),
        # q = (1 - ls) onehot(y) + ls / C (see reference._cross_entropy).
        label_smoothing_f64 = tl.load(floats_ptr + 2)
        label_smoothing = label_smoothing_f64.to(DTYPE)
        smoothing_share = (label_smoothing_f64 / n_out).to(DTYPE)
        y = tl.load(y_ptr + rows * stride_yn, mask=row_mask, other=0)
        kept = row_mask & (y != ignore_index)
        # Pass 1: the running max m, sum of exp(z - m), the target's logit and the sum of logits.
        m = tl.full((BLOCK_N,), float("-inf"), DTYPE)
        s = tl.zeros((BLOCK_N,), dtype=DTYPE)
        z_y = tl.zeros((BLOCK_N,), dtype=DTYPE)
        z_sum = tl.zeros((BLOCK_N,), dtype=DTYPE)
        for c0 in range(0, n_out, BLOCK_O):
            cols = c0 + cs
            mask = row_mask[:, None] & (cols < n_out)[None, :]
            z = tl.load(pred_ptr + rows[:, None] * n_out + cols[None, :], mask=mask, other=0.0)
            z_max = tl.where((cols < n_out)[None, :], z, float("-inf"))
            m_next = tl.maximum(m, tl.max(z_max, axis=1))
            s = s * tl.exp(m - m_next) + tl.sum(tl.exp(z_max - m_next[:, None]), axis=1)
            m = m_next
            z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
            z_sum += tl.sum(z, axis=1)
        lse = m + tl.log(s)
        row = (1.0 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - z_sum / n_out)
        loss_sum = tl.where(kept, row, 0.0)
        if NEED_GRAD:
            # Pass 2: dz = (p - q) / count on kept rows, 0 on ignored ones.
            for c0 in range(0, n_out, BLOCK_O):
                cols = c0 + cs
                mask = row_mask[:, None] & (cols < n_out)[None, :]
                tile = rows[:, None] * n_out + cols[None, :]
                z = tl.load(pred_ptr + tile, mask=mask, other=0.0)
                p = tl.exp(z - lse[:, None])
                q = smoothing_share + tl.where(cols[None, :] == y[:, None], 1.0 - label_smoothing,
                                               0.0)
                g = tl.where(kept[:, None], (p - q) * inv_count, 0.0)
                if ACTIVATION != _IDENTITY:
                    saved = tl.load(saved_ptr + tile, mask=mask, other=0.0)
                    g = _activation_backward(g, saved, slope, ACTIVATION)
                tl.store(dz_ptr + tile, g, mask=mask)
    else:
        for c0 in range(0, n_out, BLOCK_O):
            cols = c0 + cs
            mask = row_mask[:, None] & (cols < n_out)[None, :]
            tile = rows[:, None] * n_out + cols[None, :]
            pred = tl.load(pred_ptr + tile, mask=mask, other=0.0)
            y = tl.load(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yo, mask=mask,
                        other=0.0)
            value, grad = _elementwise_loss(pred, y, loss_param, LOSS)
            loss_sum += tl.sum(tl.where(mask, value, 0.0), axis=1)
            if NEED_GRAD:
                g = grad * inv_count
                if ACTIVATION != _IDENTITY:
                    saved = tl.load(saved_ptr + tile, mask=mask, other=0.0)
                    g = _activation_backward(g, saved, slope, ACTIVATION)
                tl.store(dz_ptr + tile, g, mask=mask)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(loss_sum, axis=0))


@triton.jit
def _backward_input_kernel(dz_ptr, w_ptr, saved_ptr, dz_in_ptr, slope_ptr, n, n_in, n_out,
                           ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    # dz_in[rows, ks] = (dz[rows, :] @ W[:, ks]) * act'(saved[rows, ks]): the gradient of the
    # layer below's pre-activation (its activation ACTIVATION, its slope at slope_ptr).
    # dz (n, n_out), W (n_out, n_in), saved and dz_in (n, n_in): all contiguous.
    DTYPE: tl.constexpr = dz_in_ptr.dtype.element_ty
    g, rows, ks, row_mask, k_mask = program_tile_dot(
        dz_ptr, w_ptr, n, n_out, n_in, n_out, 1, n_in, 1,
        DTYPE, BLOCK_ROWS=BLOCK_N, BLOCK_INNER=BLOCK_O, BLOCK_COLS=BLOCK_K)
    mask = row_mask[:, None] & k_mask[None, :]
    tile = rows[:, None] * n_in + ks[None, :]
    if ACTIVATION != _IDENTITY:
        saved = tl.load(saved_ptr + tile, mask=mask, other=0.0)
        g = _activation_backward(g, saved, tl.load(slope_ptr).to(DTYPE), ACTIVATION)
    tl.store(dz_in_ptr + tile, g, mask=mask)


# ---- Checks (the native ops': csrc/stack_spec.h, csrc/multi_tensor_checks.h) -----------------


class _Layer(NamedTuple):
    weight: Tensor
    bias: Tensor | None
    weight_index: int  # in params; the bias, if any, right after it
    activation: int


def _check_spec(op: str, has_bias, layer_params, activations, activation_params, loss: int,
                reduction: int, loss_param: float, label_smoothing: float) -> None:
    """make_stack_spec: the description's values."""
    layers = len(activations)
    if layers < 1:
        raise ValueError(f"{op}: a stack needs at least one layer, got activations of length 0")
    if not len(has_bias) == len(layer_params) == len(activation_params) == layers:
        raise ValueError(f"{op}: has_bias, layer_params, activations and activation_params need "
                         f"one entry per layer, got {len(has_bias)}, {len(layer_params)}, "
                         f"{layers} and {len(activation_params)}")
    for l, code in enumerate(activations):
        if not 0 <= code <= 7:
            raise ValueError(f"{op}: activations[{l}] must be an Activation code 0-7 "
                             f"(fusedtrain.stacks.Activation), got {code}")
    if not 0 <= loss <= 5:
        raise ValueError(f"{op}: loss must be a Loss code 0-5 (fusedtrain.stacks.Loss), got {loss}")
    if reduction not in (MEAN, SUM):
        raise ValueError(f"{op}: reduction must be {MEAN} (mean) or {SUM} (sum), got {reduction}")
    if not loss_param >= 0.0:
        raise ValueError(f"{op}: loss_param (beta or delta) must be >= 0, got {loss_param}")
    if loss == Loss.HUBER and not loss_param > 0.0:
        raise ValueError(f"{op}: HuberLoss needs delta > 0, got {loss_param}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_dense(op: str, params: list[Tensor], i: int) -> None:
    if params[i].layout != torch.strided or not params[i].is_contiguous():
        raise ValueError(f"{op}: params[{i}] must be a dense contiguous tensor: it is updated "
                         "in place")


def _check_layer_param(op: str, x: Tensor, params: list[Tensor], i: int, role: str,
                       shape_text: str, shape_ok: bool) -> None:
    """params[i], a layer's weight or bias (role: "layer l's weight"): x's dtype and device, the
    shape that shape_text names (shape_ok: it has it), dense and contiguous."""
    t = params[i]
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: params[{i}] ({role}) has dtype {t.dtype} but x has dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: params[{i}] ({role}) is on {t.device} but x is on {x.device}")
    if not shape_ok:
        raise ValueError(f"{op}: params[{i}] ({role}) must have shape {shape_text}, got "
                         f"{tuple(t.shape)}")
    _check_dense(op, params, i)


def _check_tensors(op: str, x: Tensor, target: Tensor, params: list[Tensor], has_bias,
                   layer_params, activations, loss: int, ignore_index: int) -> list[_Layer]:
    """check_stack_tensors, where the kernels can run, and cross entropy's classes (on the CPU);
    returns the layers."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (N, in), got shape {tuple(x.shape)}")
    if x.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    role = [None] * len(params)  # "weight" or "bias"
    for l, (i, bias) in enumerate(zip(layer_params, has_bias)):
        last = i + (1 if bias else 0)
        if not (0 <= i and last < len(params)):
            raise ValueError(f"{op}: layer_params[{l}] = {i} is outside the {len(params)} params")
        if role[i] == "bias" or (last != i and role[last] == "weight"):
            raise ValueError(f"{op}: layer_params[{l}] gives params[{i}] or params[{last}] a "
                             "second role (weight and bias)")
        role[i] = "weight"
        if last != i:
            role[last] = "bias"
    for i, r in enumerate(role):
        if r is None:
            raise ValueError(f"{op}: params[{i}] is used by no layer (layer_params)")
    layers, width = [], x.shape[1]
    for l, (i, bias) in enumerate(zip(layer_params, has_bias)):
        w = params[i]
        _check_layer_param(op, x, params, i, f"layer {l}'s weight", f"(out, {width})",
                           w.dim() == 2 and w.shape[1] == width)
        width = w.shape[0]
        b = params[i + 1] if bias else None
        if b is not None:
            _check_layer_param(op, x, params, i + 1, f"layer {l}'s bias", f"({width})",
                               b.dim() == 1 and b.shape[0] == width)
        layers.append(_Layer(w, b, i, int(activations[l])))
    if target.device != x.device:
        raise ValueError(f"{op}: target is on {target.device} but x is on {x.device}")
    if loss == Loss.CROSS_ENTROPY:
        if target.dtype != torch.int64:
            raise TypeError(f"{op}: cross entropy takes class indices: target must be int64, got "
                            f"{target.dtype}")
        if target.dim() != 1 or target.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: target must have shape ({x.shape[0]}), got "
                             f"{tuple(target.shape)}")
    else:
        if target.dtype != x.dtype:
            raise TypeError(f"{op}: target has dtype {target.dtype} but x has dtype {x.dtype}")
        if target.dim() != 2 or tuple(target.shape) != (x.shape[0], width):
            raise ValueError(f"{op}: target must have shape ({x.shape[0]}, {width}) (expand it "
                             f"first), got {tuple(target.shape)}")
    if triton.knobs.runtime.interpret:
        if x.device.type != "cpu":
            raise RuntimeError(f"{op}: x is on {x.device}: under TRITON_INTERPRET=1 the kernels "
                               "run on CPU tensors only (the optimizer kernels read host "
                               "addresses)")
    elif x.device.type != "cuda":
        raise ValueError(f"{op}: x is on {x.device}: the Triton kernels run on CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")
    if loss == Loss.CROSS_ENTROPY and x.device.type == "cpu":
        classes = width
        bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"{op}: Target {int(target[i])} is out of bounds ({classes} classes; "
                             f"target[{i}])")
    return layers


def _check_state(op: str, name: str, tensors: list[Tensor], params: list[Tensor],
                 expected: int) -> None:
    """check_list_length and check_like_param: one tensor per param, like it."""
    if len(tensors) != expected:
        raise ValueError(f"{op}: {name} has {len(tensors)} tensors, expected {expected} (one per "
                         "param)")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t.layout != torch.strided:
            raise ValueError(f"{op}: {name}[{i}] must be a dense tensor, got layout {t.layout}")
        if t.shape != p.shape:
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has "
                             f"shape {tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype} but params[{i}] has dtype "
                            f"{p.dtype}")
        if t.device != p.device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is on "
                             f"{p.device}")


def _check_scalar(op: str, name: str, t: Tensor, devices: tuple[torch.device, ...]) -> None:
    """check_scalar_tensor: one float32 or float64 element, on one of `devices`."""
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must have one element, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if t.device not in devices:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {devices[0]}")


def _check_lr_tensor(op: str, lr_tensor: Tensor | None, device: torch.device) -> None:
    """lr_tensor on the params' device (the kernels read it there) or the CPU (read without
    waiting for any device)."""
    if lr_tensor is not None:
        _check_scalar(op, "lr_tensor", lr_tensor, (device, torch.device("cpu")))


def _check_call(op: str, x: Tensor, target: Tensor, params: list[Tensor], has_bias,
                layer_params, activations, activation_params, loss: int, reduction: int,
                loss_param: float, ignore_index: int, label_smoothing: float) -> list[_Layer]:
    """What every stack op checks before its first kernel; returns the layers."""
    _check_spec(op, has_bias, layer_params, activations, activation_params, loss, reduction,
                loss_param, label_smoothing)
    return _check_tensors(op, x, target, params, has_bias, layer_params, activations, loss,
                          ignore_index)


# ---- The ops ---------------------------------------------------------------------------------


def _layer_buffers(n: int, layer: _Layer, need_grads: bool,
                   like: Tensor) -> tuple[Tensor, Tensor | None]:
    """h_l, and z_l where the derivative needs it."""
    shape = (n, layer.weight.shape[0])
    h = torch.empty(shape, dtype=like.dtype, device=like.device)
    keep_z = need_grads and layer.activation in _DERIVATIVE_FROM_Z
    return h, (torch.empty_like(h) if keep_z else None)


def _weight_grads(dz: Tensor, h_in: Tensor, layer: _Layer, grads: list[Tensor | None]) -> None:
    """grad W = dz^T h_in and grad b = column sums of dz into grads (added to what another use
    of the same params put there)."""
    n, n_in = h_in.shape
    n_out = layer.weight.shape[0]
    tiling = linear_mse._tiling(n, n_in, n_out, h_in.device)
    has_bias = layer.bias is not None
    shape_w, shape_b = (n_out, n_in), (n_out,)
    if tiling.splits > 1:
        shape_w, shape_b = (tiling.splits, *shape_w), (tiling.splits, *shape_b)
    gw = torch.empty(shape_w, dtype=dz.dtype, device=dz.device)
    gb = torch.empty(shape_b, dtype=dz.dtype, device=dz.device) if has_bias else dz
    linear_mse._grad_params_kernel[tiling.grad_params_grid](
        dz, h_in, gw, gb, n, n_in, n_out, tiling.rows_per_split, h_in.stride(0), h_in.stride(1),
        HAS_BIAS=has_bias, BLOCK_N=tiling.block_n, BLOCK_O=tiling.block_o,
        BLOCK_K=tiling.block_k, **_OPTIONS)
    pairs = [(layer.weight_index, gw)] + ([(layer.weight_index + 1, gb)] if has_bias else [])
    for index, grad in pairs:
        if tiling.splits > 1:
            grad = grad.sum(dim=0)
        if grads[index] is None:
            grads[index] = grad
        else:
            grads[index] += grad


def _run(x: Tensor, target: Tensor, params: list[Tensor], layers: list[_Layer],
         activation_params: list[float], loss: int, reduction: int, loss_param: float,
         ignore_index: int, label_smoothing: float,
         need_grads: bool) -> tuple[Tensor, list[Tensor]]:
    """The kernels of a checked call, on x's device (current)."""
    if len(layers) == 1 and layers[0].activation == Activation.IDENTITY and loss == Loss.MSE:
        value, grad_weight, grad_bias, _ = linear_mse.linear_mse_fwd_bwd(
            x, layers[0].weight, layers[0].bias, target, reduction, False, need_grads)
        grads = ([grad_weight] + ([grad_bias] if layers[0].bias is not None else [])
                 if need_grads else [])
        return value, grads

    n = x.shape[0]
    dtype, device = x.dtype, x.device
    n_out = layers[-1].weight.shape[0]
    if loss == Loss.SMOOTH_L1 and loss_param == 0:
        loss = Loss.L1  # torch's smooth_l1_loss with beta 0 is l1_loss
    count = 1 if reduction == SUM else n * n_out
    # floats: each layer's activation param, then loss_param, label_smoothing and the divisor.
    floats = host_table([*activation_params, loss_param, label_smoothing, float(count)],
                        torch.float64, device)
    depth = len(layers)
    divisor = floats[depth + 2]
    if loss == Loss.CROSS_ENTROPY and reduction == MEAN:
        divisor = (target != ignore_index).sum(dtype=torch.float64)  # the rows not ignored

    # Forward: each layer's input, and what its derivative reads (z, or h = act(z)).
    inputs, saved, h = [], [], x
    for l, layer in enumerate(layers):
        h_out, z = _layer_buffers(n, layer, need_grads, x)
        n_in, width = layer.weight.shape[1], layer.weight.shape[0]
        tiling = linear_mse._tiling(n, n_in, width, device)
        if n > 0:
            _layer_forward_kernel[tiling.forward_grid](
                h, layer.weight, layer.weight if layer.bias is None else layer.bias,
                h_out if z is None else z, h_out, floats[l:],
                n, n_in, width, h.stride(0), h.stride(1),
                HAS_BIAS=layer.bias is not None, ACTIVATION=layer.activation,
                STORE_Z=z is not None, BLOCK_N=tiling.block_n, BLOCK_O=tiling.block_o,
                BLOCK_K=tiling.block_k, **_OPTIONS)
        inputs.append(h)
        saved.append(h_out if z is None else z)
        h = h_out

    # The loss, and the gradient of the last layer's pre-activation.
    block_n = linear_mse._block(n, linear_mse.MAX_BLOCK_N)
    block_o = linear_mse._block(n_out, linear_mse.MAX_BLOCK_O)
    partials = torch.zeros((triton.cdiv(n, block_n),), dtype=dtype, device=device)
    dz = torch.empty_like(h) if need_grads else h
    if n > 0:
        _loss_kernel[partials.shape](
            h, saved[-1], target, dz, partials, divisor, floats[depth - 1:],
            n, n_out, target.stride(0), target.stride(-1), ignore_index,
            LOSS=int(loss), ACTIVATION=layers[-1].activation, NEED_GRAD=need_grads,
            BLOCK_N=block_n, BLOCK_O=block_o, **_OPTIONS)
    # Summed in fp64 as the native ops do; under "mean" nothing to average over is 0 / 0 = NaN.
    value = (partials.sum(dtype=torch.float64) / divisor).to(dtype)
    if not need_grads:
        return value, []

    if n == 0:  # sums over no rows
        return value, [torch.zeros_like(p) for p in params]

    grads: list[Tensor | None] = [None] * len(params)
    for l in reversed(range(depth)):
        layer = layers[l]
        _weight_grads(dz, inputs[l], layer, grads)
        if l > 0:
            n_in, width = layer.weight.shape[1], layer.weight.shape[0]
            tiling = linear_mse._tiling(n, n_in, width, device)
            dz_below = torch.empty((n, n_in), dtype=dtype, device=device)
            _backward_input_kernel[tiling.grad_x_grid](
                dz, layer.weight, saved[l - 1], dz_below, floats[l - 1:], n, n_in, width,
                ACTIVATION=layers[l - 1].activation, BLOCK_N=tiling.block_n,
                BLOCK_O=tiling.block_o, BLOCK_K=tiling.block_k, **_OPTIONS)
            dz = dz_below
    return value, grads


def stack_fwd_bwd(x: Tensor, target: Tensor, params: list[Tensor], has_bias: list[bool],
                  layer_params: list[int], activations: list[int], activation_params: list[float],
                  loss: int, reduction: int, loss_param: float, ignore_index: int,
                  label_smoothing: float, need_grads: bool = True) -> tuple[Tensor, list[Tensor]]:
    """The loss of a layer stack on (x, target) and the gradient of every param, in the order of
    params ([] unless need_grads): see fusedtrain.reference.stack_fwd_bwd."""
    spec = (has_bias, layer_params, activations, activation_params, loss, reduction, loss_param,
            ignore_index, label_smoothing)
    layers = _check_call("stack_fwd_bwd", x, target, params, *spec)
    with torch.no_grad(), device_guard(x.device):
        return _run(x, target, params, layers, list(activation_params), loss, reduction,
                    loss_param, ignore_index, label_smoothing, need_grads)


def stack_adam_step_(x: Tensor, target: Tensor, params: list[Tensor], has_bias: list[bool],
                     layer_params: list[int], activations: list[int],
                     activation_params: list[float], loss: int, reduction: int, loss_param: float,
                     ignore_index: int, label_smoothing: float, exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor],
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     decoupled: bool, amsgrad: bool, maximize: bool,
                     lr_tensor: Tensor | None = None) -> Tensor:
    """One Adam/AdamW step of a layer stack, in place: stack_fwd_bwd, then adam_step_ on (params,
    their gradients); returns the loss before the update."""
    op = "stack_adam_step_"
    layers = _check_call(op, x, target, params, has_bias, layer_params, activations,
                         activation_params, loss, reduction, loss_param, ignore_index,
                         label_smoothing)
    _check_state(op, "exp_avgs", exp_avgs, params, len(params))
    _check_state(op, "exp_avg_sqs", exp_avg_sqs, params, len(params))
    _check_state(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, len(params) if amsgrad else 0)
    if len(steps) != len(params):
        raise ValueError(f"{op}: steps has {len(steps)} tensors, expected {len(params)} (one per "
                         "param)")
    for i, step in enumerate(steps):  # the kernels read and increment them on x's device
        _check_scalar(op, f"steps[{i}]", step, (x.device,))
    _check_lr_tensor(op, lr_tensor, x.device)
    with torch.no_grad(), device_guard(x.device):
        value, grads = _run(x, target, params, layers, list(activation_params), loss, reduction,
                            loss_param, ignore_index, label_smoothing, True)
        _adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
                   eps, weight_decay, decoupled, amsgrad, maximize, lr_tensor=lr_tensor)
    return value


def stack_sgd_step_(x: Tensor, target: Tensor, params: list[Tensor], has_bias: list[bool],
                    layer_params: list[int], activations: list[int],
                    activation_params: list[float], loss: int, reduction: int, loss_param: float,
                    ignore_index: int, label_smoothing: float, momentum_buffers: list[Tensor],
                    lr: float, momentum: float, dampening: float, weight_decay: float,
                    nesterov: bool, maximize: bool, first_step: bool,
                    lr_tensor: Tensor | None = None) -> Tensor:
    """One SGD step of a layer stack, in place: stack_fwd_bwd, then sgd_step_ on (params, their
    gradients); returns the loss before the update. first_step: the momentum buffers are new and
    start as the first gradient."""
    op = "stack_sgd_step_"
    layers = _check_call(op, x, target, params, has_bias, layer_params, activations,
                         activation_params, loss, reduction, loss_param, ignore_index,
                         label_smoothing)
    _check_state(op, "momentum_buffers", momentum_buffers, params,
                 len(params) if momentum != 0 else 0)
    _check_lr_tensor(op, lr_tensor, x.device)
    with torch.no_grad(), device_guard(x.device):
        value, grads = _run(x, target, params, layers, list(activation_params), loss, reduction,
                            loss_param, ignore_index, label_smoothing, True)
        _sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                  nesterov, maximize, first_step, lr_tensor=lr_tensor)
    return value
