"""The tile product that the linear + MSE and layer-stack kernels share (forward, grad_x, the
stacks' forward and backward through a layer's input): each program of a grid flattened onto
axis 0 owns one tile of A @ B, A (rows, inner) and B (inner, cols) addressed by strides, and
accumulates it with tl.dot over BLOCK_INNER-wide slices of `inner`. The caller's epilogue (bias,
loss, activation, store) works on the tile it gets back.

Padding rows, columns and inner indices load as 0, which adds nothing to any dot product.
Indices are int64, so tensors of more than 2^31 elements are addressed correctly."""

from __future__ import annotations

import triton
import triton.language as tl

# fp32 products in full precision: tl.dot would use TF32 tensor cores on NVIDIA GPUs by default.
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def program_tile_dot(a_ptr, b_ptr, n_rows, n_inner, n_cols,
                     stride_a_row, stride_a_inner, stride_b_inner, stride_b_col,
                     DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_INNER: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """This program's (BLOCK_ROWS, BLOCK_COLS) tile of A @ B in DTYPE, the column blocks of a
    row block on consecutive programs: (tile, rows, cols, row_mask, col_mask)."""
    pid = tl.program_id(0)
    pid_row = pid // tl.cdiv(n_cols, BLOCK_COLS)
    pid_col = pid % tl.cdiv(n_cols, BLOCK_COLS)
    rows = pid_row.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_col.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    slice_offsets = tl.arange(0, BLOCK_INNER).to(tl.int64)
    row_mask = rows < n_rows
    col_mask = cols < n_cols

    tile = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=DTYPE)
    for i0 in range(0, n_inner, BLOCK_INNER):
        inner = i0 + slice_offsets
        inner_mask = inner < n_inner
        a = tl.load(a_ptr + rows[:, None] * stride_a_row + inner[None, :] * stride_a_inner,
                    mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        b = tl.load(b_ptr + inner[:, None] * stride_b_inner + cols[None, :] * stride_b_col,
                    mask=inner_mask[:, None] & col_mask[None, :], other=0.0)
        tile = tl.dot(a, b, tile, input_precision=DOT_PRECISION)
    return tile, rows, cols, row_mask, col_mask
