"""Triton kernels for the op ``linear_mse_fwd_bwd``: a linear layer, the MSE loss and its gradients.

``linear_mse_fwd_bwd`` has the signature and the results of fusedtrain.reference's (the oracle the
tests hold it to): x (N, in), weight (out, in), bias (out,) or None, target (N, out) (expanded
already; any strides, a stride of 0 included), reduction 1 (mean) or 2 (sum). It returns the loss
(0-dim, x's dtype), grad_weight (out, in), grad_bias (out,) and grad_x (N, in); a gradient that
is not asked for (need_grad_params, need_grad_x; grad_bias also without a bias) is an empty
tensor. The formulas are those of csrc/include/fusedtrain/linear_mse_math.h:

    pred = x W^T + b     r = pred - y     loss = sum r^2 / R     g = dloss/dpred = (2 / R) r
    grad_W = g^T x       grad_b = sum over rows of g             grad_x = g W

with R = N * out under "mean" and 1 under "sum".

Design: up to three launches, all on the tensors' device, no host synchronization. The forward
and grad_x tiles are fusedtrain.triton._tile_dot's tile product, which the stack kernels share.

* _forward_kernel, one program per (row block, out block): program (i, j) computes the (BLOCK_N, BLOCK_O)
  tile of pred with tl.dot over BLOCK_K-wide slices of `in`, adds the bias, subtracts the target,
  writes its partial sum of r^2 to a small buffer (one value per program) and, if a gradient is
  asked for, g = (2 / R) r to an (N, out) buffer in the compute dtype. The host sums the partials
  with torch.sum in fp64 (a device-side reduction, not a sync) and divides by R, as the C++ op
  does with its double loss_sum. The loss-only call stores no g.
* _grad_params_kernel, one program per (out block, in block, split): grad_W = g^T x, a reduction over
  N: each program owns a (BLOCK_O, BLOCK_K) tile of grad_W and loops over its split's rows in
  BLOCK_N steps, tl.dot into an accumulator; the programs of the first in-block also sum the
  columns of g for grad_b. With one split the tiles are stored into grad_W and grad_b directly;
  for tall, narrow problems (few tiles, many rows) the rows are split so that about MIN_PROGRAMS
  programs run, each stores its partial tile to a (splits, out, in) buffer, and torch.sum over
  the splits finishes. No atomics: the result is deterministic.
* _grad_x_kernel, one program per (row block, in block), only with need_grad_x: grad_x = g W,
  tl.dot over BLOCK_O-wide slices of `out`.

Every grid is flattened onto axis 0, where CUDA allows 2^31 - 1 programs, and each program finds
its tile from its index: axes 1 and 2 allow only 65,535, which the in blocks alone pass at
in > 65,535 * BLOCK_K (about 2.1M with 32-wide blocks). _tiling sizes the grids.

Unlike the C++ CPU kernel, which never stores the prediction, g makes a round trip through
memory (N * out values): on a GPU, recomputing it in each gradient kernel would cost more than
reading it.

Precision: the math runs in the inputs' dtype, fp32 or fp64, accumulating in that dtype; other
dtypes are refused (TypeError), as by the native op. tl.dot on fp32 would use TF32 tensor cores
by default on NVIDIA GPUs (10-bit mantissas, relative errors near 1e-3): the kernels ask for
input_precision="ieee", full fp32 products. fp64 goes through tl.dot too: Triton accepts fp64
operands (fp64 MMA on sm_80 and later, FMA loops elsewhere; numpy under the interpreter), so there
is no fallback path. The mean's 2 / R is computed in fp64 in the kernel from the integer R and
rounded once to the compute dtype, as the C++ op rounds its double two_over_count; R is never
passed as a float, since Triton passes Python floats as fp32. FMA contraction is off
(enable_fp_fusion=False), as in the optimizer kernels.

Tiles: tl.dot wants every tile dimension to be at least 16 on some backends and Triton versions,
so the block sizes are powers of two between 16 and MAX_BLOCK_* (shrunk to the problem's sizes),
and the tiles are padded through masked loads: padding rows and columns load as 0, which adds
nothing to any dot product, and the residuals of padding are zeroed before they are summed or
stored. Offsets are computed in int64, so tensors of more than 2^31 elements are addressed
correctly.

Under the interpreter (TRITON_INTERPRET=1) the same kernels run on CPU tensors with numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedtrain.reference import MEAN, SUM
from fusedtrain.triton._device import device_guard
from fusedtrain.triton._tile_dot import DOT_PRECISION, program_tile_dot

# Upper bounds on the tile sizes (powers of two, at least 16). Read at each call, so tests may
# shrink them to make small problems span several tiles.
MAX_BLOCK_N = 64
MAX_BLOCK_O = 64
MAX_BLOCK_K = 32
# The number of programs that _grad_params_kernel should have at least, by splitting the rows;
# None: four per streaming multiprocessor on CUDA, 1 (no split) elsewhere. Read at each call.
MIN_PROGRAMS: int | None = None

_MIN_BLOCK = 16  # tl.dot's smallest tile dimension on some backends
_NUM_WARPS = 4
_COMPUTE_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _two_over_count(count, DTYPE: tl.constexpr):
    """2 / count, divided in fp64 and rounded once to DTYPE."""
    return (2.0 / count.to(tl.float64)).to(DTYPE)


@triton.jit(do_not_specialize=["count"])
def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, g_ptr, partial_ptr,
                    n, n_in, n_out, count,
                    stride_xn, stride_xk, stride_wo, stride_wk, stride_b, stride_yn, stride_yo,
                    HAS_BIAS: tl.constexpr, STORE_G: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # Formulas: csrc/include/fusedtrain/linear_mse_math.h (pred, residual, loss, mse_grad).
    DTYPE: tl.constexpr = partial_ptr.dtype.element_ty
    # pred tile = x[rows, :] @ W[cols, :]^T, BLOCK_K columns of x at a time.
    pred, rows, cols, row_mask, col_mask = program_tile_dot(
        x_ptr, w_ptr, n, n_in, n_out, stride_xn, stride_xk, stride_wk, stride_wo,
        DTYPE, BLOCK_ROWS=BLOCK_N, BLOCK_INNER=BLOCK_K, BLOCK_COLS=BLOCK_O)
    if HAS_BIAS:
        pred = pred + tl.load(b_ptr + cols * stride_b, mask=col_mask, other=0.0)[None, :]

    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yo, mask=mask,
                other=0.0)
    r = tl.where(mask, pred - y, 0.0)
    loss_sum = tl.sum(tl.sum(r * r, axis=1), axis=0)
    tl.store(partial_ptr + tl.program_id(0), loss_sum)  # partials[row block, out block]
    if STORE_G:
        g = _two_over_count(count, DTYPE) * r
        tl.store(g_ptr + rows[:, None] * n_out + cols[None, :], g, mask=mask)


@triton.jit
def _grad_params_kernel(g_ptr, x_ptr, gw_ptr, gb_ptr,
                        n, n_in, n_out, rows_per_split, stride_xn, stride_xk,
                        HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad_W[cols, ks] (+)= g[rows, cols]^T @ x[rows, ks] over this split's rows;
    # grad_b[cols] (+)= sum over rows of g[rows, cols] (programs of the first in-block only).
    DTYPE: tl.constexpr = gw_ptr.dtype.element_ty
    # At least one in-block, so that grad_bias is computed even when in == 0.
    k_blocks = tl.maximum(tl.cdiv(n_in, BLOCK_K), 1)
    tiles = tl.cdiv(n_out, BLOCK_O) * k_blocks
    pid = tl.program_id(0)
    split = pid // tiles
    pid_o = pid % tiles // k_blocks
    pid_k = pid % k_blocks
    cols = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < n_out
    k_mask = ks < n_in
    first = split.to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, n)

    grad_w = tl.zeros((BLOCK_O, BLOCK_K), dtype=DTYPE)
    grad_b = tl.zeros((BLOCK_O,), dtype=DTYPE)
    for n0 in range(first, last, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < last
        g_t = tl.load(g_ptr + cols[:, None] + rows[None, :] * n_out,
                      mask=col_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        grad_w = tl.dot(g_t, x, grad_w, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_k == 0:
                grad_b += tl.sum(g_t, axis=1)

    tile = split.to(tl.int64) * n_out * n_in + cols[:, None] * n_in + ks[None, :]
    tl.store(gw_ptr + tile, grad_w, mask=col_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(gb_ptr + split.to(tl.int64) * n_out + cols, grad_b, mask=col_mask)


@triton.jit
def _grad_x_kernel(g_ptr, w_ptr, gx_ptr, n, n_in, n_out, stride_wo, stride_wk,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad_x[rows, ks] = g[rows, :] @ W[:, ks], BLOCK_O columns of g at a time.
    DTYPE: tl.constexpr = gx_ptr.dtype.element_ty
    grad_x, rows, ks, row_mask, k_mask = program_tile_dot(
        g_ptr, w_ptr, n, n_out, n_in, n_out, 1, stride_wo, stride_wk,
        DTYPE, BLOCK_ROWS=BLOCK_N, BLOCK_INNER=BLOCK_O, BLOCK_COLS=BLOCK_K)
    tl.store(gx_ptr + rows[:, None] * n_in + ks[None, :], grad_x,
             mask=row_mask[:, None] & k_mask[None, :])


def _block(size: int, most: int) -> int:
    """The tile size for a dimension of `size`: a power of two in [16, most], no larger than
    needed."""
    return max(_MIN_BLOCK, min(most, triton.next_power_of_2(max(size, 1))))


def _arg(t: Tensor, spare: Tensor) -> Tensor:
    """`t`, or `spare` (non-empty, same dtype and device) if `t` has no elements."""
    return t if t.numel() > 0 else spare


def _min_programs(device: torch.device) -> int:
    if MIN_PROGRAMS is not None:
        return MIN_PROGRAMS
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# The most programs a grid may have: CUDA's limit on grid axis 0.
_MAX_PROGRAMS = 2**31 - 1


class _Tiling(NamedTuple):
    """The tile sizes and the flattened grids of a call."""

    block_n: int
    block_o: int
    block_k: int
    row_blocks: int
    out_blocks: int
    in_blocks: int
    splits: int           # _grad_params_kernel's row splits
    rows_per_split: int
    forward_grid: tuple[int]
    grad_params_grid: tuple[int]
    grad_x_grid: tuple[int]


def _tiling(n: int, n_in: int, n_out: int, device: torch.device) -> _Tiling:
    """Tiles for x (n, n_in) and weight (n_out, n_in): the kernels' grids, each on axis 0 only
    (see the module's docstring) and within its limit."""
    block_n = _block(n, MAX_BLOCK_N)
    block_o = _block(n_out, MAX_BLOCK_O)
    block_k = _block(n_in, MAX_BLOCK_K)
    row_blocks = triton.cdiv(n, block_n)
    out_blocks = triton.cdiv(n_out, block_o)
    in_blocks = triton.cdiv(n_in, block_k)
    # At least one in-block, so that grad_bias is computed even when in == 0.
    tiles = out_blocks * max(in_blocks, 1)
    splits = max(1, min(row_blocks, triton.cdiv(_min_programs(device), max(tiles, 1))))
    rows_per_split = max(1, triton.cdiv(row_blocks, splits)) * block_n
    splits = max(1, triton.cdiv(n, rows_per_split))  # none empty
    grids = ((row_blocks * out_blocks,), (tiles * splits,), (row_blocks * in_blocks,))
    if max(programs for (programs,) in grids) > _MAX_PROGRAMS:
        raise ValueError(f"linear_mse_fwd_bwd: x of shape ({n}, {n_in}) with {n_out} outputs "
                         f"needs more than {_MAX_PROGRAMS} tiles")
    return _Tiling(block_n, block_o, block_k, row_blocks, out_blocks, in_blocks, splits,
                   rows_per_split, *grids)


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                  reduction: int) -> None:
    """The native op's checks (check_linear_mse_inputs), with the same exception types."""
    op = "linear_mse_fwd_bwd"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (N, in), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must have shape (out, {x.shape[1]}) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if x.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    others = [("weight", weight), ("target", target)]
    if bias is not None:
        others.append(("bias", bias))
    for name, t in others:
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]}), got {tuple(bias.shape)}")
    if target.dim() != 2 or tuple(target.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"{op}: target must have shape ({x.shape[0]}, {weight.shape[0]}) "
                         f"(expand it first), got {tuple(target.shape)}")
    if reduction not in (MEAN, SUM):
        raise ValueError(f"{op}: reduction must be {MEAN} (mean) or {SUM} (sum), got {reduction}")


def linear_mse_fwd_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: int,
    need_grad_x: bool,
    need_grad_params: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear + MSE loss and its gradients: see fusedtrain.reference.linear_mse_fwd_bwd.

    Returns (loss, grad_weight, grad_bias, grad_x); gradients not asked for are empty tensors.
    Under "mean" with no residual at all (N * out == 0) the loss is NaN, as in the native op."""
    _check_inputs(x, weight, bias, target, reduction)
    n, n_in = x.shape
    n_out = weight.shape[0]
    count = n * n_out if reduction == MEAN else 1
    dtype = x.dtype
    device = x.device
    has_bias = bias is not None
    need_g = need_grad_x or need_grad_params
    tiling = _tiling(n, n_in, n_out, device)
    blocks = dict(BLOCK_N=tiling.block_n, BLOCK_O=tiling.block_o, BLOCK_K=tiling.block_k)
    options = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)

    with device_guard(device):
        grad_weight = torch.empty((n_out, n_in), dtype=dtype, device=device) if need_grad_params \
            else x.new_empty(0)
        grad_bias = torch.empty((n_out,), dtype=dtype, device=device) \
            if need_grad_params and has_bias else x.new_empty(0)
        grad_x = torch.empty((n, n_in), dtype=dtype, device=device) if need_grad_x \
            else x.new_empty(0)
        partials = torch.empty((tiling.row_blocks, tiling.out_blocks), dtype=dtype, device=device)
        g = torch.empty((n, n_out), dtype=dtype, device=device) if need_g else partials
        if n > 0 and n_out > 0:
            # Empty tensors (in == 0) may have a null data pointer: the kernels get a non-empty
            # stand-in, which their masks keep them from reading or writing.
            _forward_kernel[tiling.forward_grid](
                _arg(x, partials), _arg(weight, partials), bias if has_bias else partials,
                target, g, partials,
                n, n_in, n_out, count,
                x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                bias.stride(0) if has_bias else 0, target.stride(0), target.stride(1),
                HAS_BIAS=has_bias, STORE_G=need_g, **blocks, **options)
        # Summed in fp64, as the C++ op sums its loss in double; N * out == 0 under "mean" is
        # 0 / 0 = NaN, as there.
        loss = (partials.sum(dtype=torch.float64) / count).to(dtype)

        if need_grad_params and n_out > 0 and n == 0:
            grad_weight.zero_()
            grad_bias.zero_()
        elif need_grad_params and n_out > 0:
            if tiling.splits == 1:
                gw, gb = grad_weight, grad_bias
            else:
                gw = torch.empty((tiling.splits, n_out, n_in), dtype=dtype, device=device)
                gb = torch.empty((tiling.splits, n_out), dtype=dtype, device=device) if has_bias \
                    else g
            _grad_params_kernel[tiling.grad_params_grid](
                g, _arg(x, g), _arg(gw, g), gb if has_bias else g,
                n, n_in, n_out, tiling.rows_per_split, x.stride(0), x.stride(1),
                HAS_BIAS=has_bias, **blocks, **options)
            if tiling.splits > 1:
                torch.sum(gw, dim=0, out=grad_weight)
                if has_bias:
                    torch.sum(gb, dim=0, out=grad_bias)

        if need_grad_x and n > 0 and n_in > 0 and n_out == 0:
            grad_x.zero_()
        elif need_grad_x and n > 0 and n_in > 0:
            _grad_x_kernel[tiling.grad_x_grid](
                g, weight, grad_x, n, n_in, n_out, weight.stride(0), weight.stride(1),
                **blocks, **options)
    return loss, grad_weight, grad_bias, grad_x
