"""The narrow-stack CUDA kernel's body (csrc/cuda/stack_narrow_kernel.cuh) run on CPU threads
(csrc/tests/test_narrow_kernel.cpp with the stand-in CUDA headers of csrc/tests/emulation: a
thread per CUDA thread, real barriers for __syncthreads, warp shuffles and the grid barrier)
against fusedtrain.reference: its tiling, shared-memory layouts (resident and staged weights),
masked tail tiles, per-block partial gradients, grid reduction, loss heads and optimizer updates
are checked without a GPU. The GPU runs the same body: tests/test_cuda_stack_narrow.py."""

import pytest
import torch
from torch import nn

from emulated_harness import (COMPILER, TOLERANCES, build_harness, params_and_state, run_harness, stack_lines,
                              update_lines)
from fusedtrain import reference
from fusedtrain.stacks import Activation
from test_cuda_stack_narrow import ACTIVATIONS, CRITERIA, OPTIMIZERS, Reused, Run, make_target, mlp

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    return build_harness(tmp_path_factory.mktemp("narrow"), "test_narrow_kernel")


def run_emulated(binary, run, x, target, blocks, tile_rows, resident):
    """One step of `run` (a Run on the CPU) through the emulated kernel; its loss, params and
    state as fp64 tensors shaped like run's."""
    header = f"{run.params[0].element_size()} {0 if run.kind == 'adam' else 1} {blocks} {tile_rows} {int(resident)}"
    values = run_harness(binary, [header, *stack_lines(run, x, target), *update_lines(run, run.first)])
    return values[0], params_and_state(values[1:], run)


def check(binary, model, criterion, optimizer, dtype, n, blocks, tile_rows, resident, seed=0):
    """One step through the reference (fp64, from the dtype's values) and the emulated kernel."""
    want = Run(model, criterion, optimizer, "cpu", torch.float64)
    start = Run(model, criterion, optimizer, "cpu", dtype)
    for w, s in zip(want.params, start.params):
        w.copy_(s.double())
    g = torch.Generator().manual_seed(seed)
    in_features = want.params[want.spec.layer_params[0]].shape[1]
    out = want.params[want.spec.layer_params[-1]].shape[0]
    x = torch.randn(n, in_features, generator=g, dtype=torch.float64).to(dtype)
    target = make_target(criterion, n, out, g)
    if target.is_floating_point():
        target = target.to(dtype)
    loss, got = run_emulated(binary, start, x, target, blocks, tile_rows, resident)
    want_loss = want.step(reference, x.double(), target.double() if target.is_floating_point() else target)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, want_loss.double(), **tol, equal_nan=True)
    expected = want.params + [t for group in want.state for t in group]
    for i, (w, e) in enumerate(zip(expected, got)):
        torch.testing.assert_close(e, w.double(), **tol, msg=lambda m: f"tensor {i}: {m}")


def test_the_tutorial_mlp_over_blocks_and_tail_tiles(emulated_kernel):
    # 70 rows in tiles of 32: two blocks, the first running tiles 0 and 2 (6 rows).
    torch.manual_seed(0)
    check(emulated_kernel, mlp([10, 64, 32, 1], Activation.RELU), nn.MSELoss(), "adam", torch.float32, 70,
          blocks=2, tile_rows=32, resident=True)


@pytest.mark.parametrize("index,activation", list(enumerate(ACTIVATIONS)), ids=lambda v: getattr(v, "name", str(v)))
def test_each_activation_with_a_loss_head(emulated_kernel, index, activation):
    criterion = list(CRITERIA)[index % len(CRITERIA)]
    optimizer = list(OPTIMIZERS)[index % len(OPTIMIZERS)]
    torch.manual_seed(index)
    widths = [3, 7, 130 // (index + 2), 5]
    model = mlp(widths, activation, last_activation=not criterion.startswith(("cross", "bce")), bias=index % 3 != 0)
    check(emulated_kernel, model, CRITERIA[criterion](), optimizer, torch.float64, 13, blocks=2, tile_rows=4,
          resident=index % 2 == 0, seed=index)


def test_staged_weights_the_widest_layers_and_cross_entropy(emulated_kernel):
    torch.manual_seed(1)
    model = mlp([5, 17, 128, 9, 4], Activation.GELU_TANH)
    check(emulated_kernel, model, nn.CrossEntropyLoss(ignore_index=1, label_smoothing=0.1), "sgd-nesterov-wd",
          torch.float64, 37, blocks=3, tile_rows=8, resident=False)


def test_a_layer_applied_twice(emulated_kernel):
    torch.manual_seed(2)
    check(emulated_kernel, Reused(), nn.BCEWithLogitsLoss(), "adam-amsgrad-wd", torch.float64, 20, blocks=3,
          tile_rows=4, resident=True)


def test_an_empty_batch_gives_a_nan_mean_and_no_move(emulated_kernel):
    torch.manual_seed(3)
    check(emulated_kernel, mlp([4, 6, 2], Activation.SILU, last_activation=True), nn.MSELoss(), "sgd-momentum",
          torch.float32, 0, blocks=1, tile_rows=8, resident=True)


def test_few_params_over_many_blocks_sum_on_several_lanes(emulated_kernel):
    # 13 params over 4 blocks: each element's 4 partials summed by 4 lanes and a shuffle tree.
    torch.manual_seed(4)
    check(emulated_kernel, mlp([2, 3, 1], Activation.LEAKY_RELU), nn.HuberLoss(delta=0.3), "adam-maximize",
          torch.float64, 100, blocks=4, tile_rows=8, resident=False)
