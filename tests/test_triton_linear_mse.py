"""The Triton linear + MSE kernels (fusedtrain.triton.linear_mse_fwd_bwd) against
fusedtrain.reference.linear_mse_fwd_bwd in fp64: on CPU tensors under the Triton interpreter, and
compiled on CUDA tensors where a GPU is present.

TRITON_INTERPRET=1 must be set before triton is imported, so each test runs this file as a
script in a fresh process, with its working directory outside the checkout so that the installed
package is the one imported. The script runs a batch of checks and fails on the first mismatch.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

from helpers import run_triton_checks

pytest.importorskip("triton")


def _run_checks(*args: str, device: str = "cpu") -> None:
    run_triton_checks(__file__, *args, device=device)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shapes_and_options_match_reference(dtype):
    _run_checks("grid", dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_many_tiles_split_rows_and_strided_inputs_match_reference(dtype):
    _run_checks("tiles", dtype)


def test_empty_problems_and_refused_inputs():
    _run_checks("edges")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernels_on_cuda_match_reference():
    _run_checks("grid", "float32", "float64", device="cuda")
    _run_checks("tiles", "float32", "float64", device="cuda")
    _run_checks("edges", device="cuda")
    _run_checks("wide", "float32", device="cuda")


@pytest.mark.parametrize("n,n_in,n_out", [(4, 3_000_000, 16), (100_000, 2_200_000, 1),
                                          (1_000, 8, 5_000_000)])
def test_grids_stay_on_axis_0_within_its_limit(n, n_in, n_out):
    """The grids of problems whose in blocks (or out blocks) alone pass the 65,535 programs that
    CUDA allows on grid axes 1 and 2: one axis, at most 2^31 - 1 programs. (The interpreter
    would take many minutes over such a grid; a GPU runs one in test_compiled_kernels_on_cuda.)"""
    from fusedtrain.triton import linear_mse

    tiling = linear_mse._tiling(n, n_in, n_out, torch.device("cpu"))
    assert max(tiling.in_blocks, tiling.out_blocks) > 65_535
    for grid in (tiling.forward_grid, tiling.grad_params_grid, tiling.grad_x_grid):
        assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1, grid
    assert tiling.forward_grid[0] == tiling.row_blocks * tiling.out_blocks
    assert tiling.grad_params_grid[0] == tiling.out_blocks * tiling.in_blocks * tiling.splits
    assert tiling.grad_x_grid[0] == tiling.row_blocks * tiling.in_blocks


# ---- The checks, run in the subprocess ------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Relative error (in the 2-norm) allowed against the fp64 reference on the same input values.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
NS, INS, OUTS = (1, 7, 100), (1, 3, 64), (1, 2, 16, 40)
# (has_bias, reduction, need_grad_x, need_grad_params): all 16.
OPTIONS = list(itertools.product((True, False), (1, 2), (True, False), (True, False)))


def _inputs(n, n_in, n_out, has_bias, dtype, device, seed, layout="contiguous"):
    """x, weight, bias, target: random values drawn in fp64 on the CPU, then rounded to dtype.

    layout "strided": x and weight transposed views, bias a view with stride 2, and the target
    a row expanded to N rows (stride 0), as the op gets it from linear_mse_loss."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)

    if layout == "contiguous":
        x, weight, target = draw(n, n_in), draw(n_out, n_in), draw(n, n_out)
        bias = draw(n_out) if has_bias else None
    else:
        x, weight = draw(n_in, n).T, draw(n_in, n_out).T
        bias = draw(2 * n_out)[::2] if has_bias else None
        target = draw(1, n_out).expand(n, n_out)
    return x, weight, bias, target


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def _check_case(label, n, n_in, n_out, has_bias, reduction, need_grad_x, need_grad_params,
                dtype, device, seed, layout="contiguous"):
    from fusedtrain import reference
    from fusedtrain.triton import linear_mse_fwd_bwd

    args = _inputs(n, n_in, n_out, has_bias, dtype, device, seed, layout)
    got = linear_mse_fwd_bwd(*args, reduction, need_grad_x, need_grad_params)
    wide = [None if t is None else t.cpu().double() for t in args]
    want = reference.linear_mse_fwd_bwd(*wide, reduction, need_grad_x, need_grad_params)
    names = ("loss", "grad_weight", "grad_bias", "grad_x")
    for name, g, w in zip(names, got, want):
        where = f"{label}: {name}"
        assert g.dtype == dtype and g.device.type == device, f"{where}: {g.dtype} on {g.device}"
        assert g.shape == w.shape, f"{where}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        err = _rel_err(g.cpu(), w)
        assert err <= TOLERANCE[dtype], f"{where}: relative error {err:.3g}"
    return got


def _check_grid(dtype: torch.dtype, device: str) -> None:
    """Every (N, in, out) of NS x INS x OUTS with all 16 option combinations."""
    count = 0
    for seed, (n, n_in, n_out) in enumerate(itertools.product(NS, INS, OUTS)):
        for options in OPTIONS:
            _check_case(f"{dtype} N={n} in={n_in} out={n_out} {options}", n, n_in, n_out,
                        *options, dtype, device, seed)
            count += 1
    print(f"grid {dtype}: {count} cases ok")


def _check_tiles(dtype: torch.dtype, device: str) -> None:
    """16-wide tiles, so that every dimension spans several; the rows of grad_weight split over
    programs; strided and expanded inputs; deterministic results."""
    from fusedtrain.triton import linear_mse

    linear_mse.MAX_BLOCK_N = linear_mse.MAX_BLOCK_O = linear_mse.MAX_BLOCK_K = 16
    count = 0
    for min_programs in (1, 1000):  # no split; as many splits as blocks of rows
        linear_mse.MIN_PROGRAMS = min_programs
        for seed, (n, n_in, n_out) in enumerate([(100, 64, 40), (7, 33, 17), (1, 3, 2),
                                                 (100, 1, 16)]):
            # Each value of each option, with and without the other gradients.
            for k, options in enumerate(OPTIONS[::5]):
                layout = "strided" if (seed + k) % 2 else "contiguous"
                label = f"{dtype} 16-wide tiles, MIN_PROGRAMS={min_programs} N={n} in={n_in} " \
                        f"out={n_out} {options} {layout}"
                first = _check_case(label, n, n_in, n_out, *options, dtype, device, seed, layout)
                if min_programs > 1:  # the splits are summed in a fixed order, too
                    again = _check_case(label, n, n_in, n_out, *options, dtype, device, seed,
                                        layout)
                    for a, b in zip(first, again):
                        assert torch.equal(a, b), f"{label}: results differ between two calls"
                count += 1
    print(f"tiles {dtype}: {count} cases ok, deterministic")


def _check_edges(device: str) -> None:
    """Empty dimensions (the loss of no residual under "mean" is NaN, as in the native op); inputs
    the op refuses, with the native op's exception types."""
    from fusedtrain import reference
    from fusedtrain.triton import linear_mse_fwd_bwd

    for dtype in DTYPES.values():
        for n, n_in, n_out in ((0, 3, 2), (5, 0, 2), (5, 3, 0), (0, 0, 0)):
            for has_bias, reduction, need_grad_x, need_grad_params in OPTIONS:
                args = _inputs(n, n_in, n_out, has_bias, dtype, device, 0)
                got = linear_mse_fwd_bwd(*args, reduction, need_grad_x, need_grad_params)
                label = f"{dtype} N={n} in={n_in} out={n_out} {has_bias, reduction}"
                if n * n_out == 0 and reduction == 1:
                    assert got[0].isnan() and got[0].dtype == dtype and got[0].dim() == 0, label
                    # The reference divides by zero; the gradients are the sum reduction's.
                    want = reference.linear_mse_fwd_bwd(*[None if t is None else t.cpu().double()
                                                          for t in args], 2, need_grad_x,
                                                        need_grad_params)
                    got = got[1:]
                    want = want[1:]
                else:
                    want = reference.linear_mse_fwd_bwd(*[None if t is None else t.cpu().double()
                                                          for t in args], reduction, need_grad_x,
                                                        need_grad_params)
                for g, w in zip(got, want):
                    assert g.shape == w.shape and g.dtype == dtype, f"{label}: {g.shape} {w.shape}"
                    err = _rel_err(g.cpu(), w)
                    assert err <= TOLERANCE[dtype], f"{label}: relative error {err:.3g}"
    print("empty dimensions: ok")

    x, w, b, y = _inputs(4, 3, 2, True, torch.float32, device, 0)
    refused = [
        (TypeError, (x.half(), w.half(), b.half(), y.half(), 1), "float16"),
        (TypeError, (x, w.double(), b, y, 1), "weight dtype"),
        (TypeError, (x, w, b, y.double(), 1), "target dtype"),
        (ValueError, (x[0], w, b, y, 1), "1-D x"),
        (ValueError, (x, w[:, :2], b, y, 1), "weight columns"),
        (ValueError, (x, w, b[:1], y, 1), "bias size"),
        (ValueError, (x, w, b, y[:, :1], 1), "unexpanded target"),
        (ValueError, (x, w, b, y, 0), "reduction none"),
        (ValueError, (x, w, b, y.to("meta"), 1), "target device"),
    ]
    for error, args, label in refused:
        try:
            linear_mse_fwd_bwd(*args, True)
        except error as e:
            print(f"refused as expected ({label}): {e}")
        else:
            raise AssertionError(f"{label}: no {error.__name__}")
    print("refused inputs: ok")


def _check_wide(dtype: torch.dtype, device: str) -> None:
    """in > 65,535 * 32 with 32-wide in blocks (more programs than grid axes 1 and 2 allow), a
    few rows: every gradient against the reference, computed on the device in fp64."""
    from fusedtrain import reference
    from fusedtrain.triton import linear_mse, linear_mse_fwd_bwd

    linear_mse.MAX_BLOCK_K = 32
    n, n_in, n_out = 5, 65_535 * 32 + 1000, 3
    for has_bias in (True, False):
        args = _inputs(n, n_in, n_out, has_bias, dtype, device, 11)
        got = linear_mse_fwd_bwd(*args, 1, True, True)
        want = reference.linear_mse_fwd_bwd(*[None if t is None else t.double() for t in args],
                                            1, True, True)
        for name, g, w in zip(("loss", "grad_weight", "grad_bias", "grad_x"), got, want):
            if w.numel():
                err = _rel_err(g, w)
                assert err <= TOLERANCE[dtype], f"in={n_in} bias={has_bias} {name}: {err:.3g}"
    print(f"wide {dtype}: in={n_in} ok")


def _main(device: str, what: str, *dtypes: str) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert interpret == (device == "cpu"), "CPU tensors need TRITON_INTERPRET=1, CUDA ones not"
    if what == "edges":
        _check_edges(device)
    for dtype in dtypes:
        {"grid": _check_grid, "tiles": _check_tiles, "wide": _check_wide}[what](DTYPES[dtype],
                                                                              device)


if __name__ == "__main__":
    _main(*sys.argv[1:])
