"""The one-launch CUDA fit kernel's body (csrc/cuda/stack_fit_kernel.cuh) run on CPU threads
(csrc/tests/test_fit_kernel.cpp with the stand-in CUDA headers of csrc/tests/emulation: a thread
per CUDA thread, real barriers for __syncthreads and warp shuffles) against the CPU's native loop
(_C.stack_fit_*_cpu) on the same batches: rows gathered through each epoch's order, a short last
batch, orders that leave rows out (drop_last), rows in order, per-epoch losses, validation, and
the Adam and SGD state carried from step to step. The GPU runs the same body:
tests/test_cuda_stack_fit.py."""

import pytest
import torch
from torch import nn

from emulated_harness import (COMPILER, TOLERANCES, build_harness, numbers, params_and_state, run_harness,
                              stack_lines, update_lines)
from fusedtrain import _extension
from fusedtrain.stacks import Activation
from test_cuda_stack_narrow import CRITERIA, Run, make_target, mlp

pytestmark = [pytest.mark.skipif(COMPILER is None, reason="no C++ compiler"),
              pytest.mark.skipif(not _extension.native_available(), reason="needs the native extension")]


@pytest.fixture(scope="module")
def fit_kernel(tmp_path_factory):
    return build_harness(tmp_path_factory.mktemp("fit"), "test_fit_kernel")


def native_hyper(run):
    """run's hyperparameters as the native loop's _C.AdamHyper / _C.SgdHyper (SGD's first step
    starts the momentum buffers)."""
    hyper = _extension._C.AdamHyper() if run.kind == "adam" else _extension._C.SgdHyper()
    for name, value in run.hyper.items():
        setattr(hyper, name, value)
    if run.kind == "sgd":
        hyper.first_step = True
    return hyper


def cpu_fit(run, x, target, epochs, batch_size, orders, val):
    """The CPU's native loop over run's params and state, in place; (train losses, val losses)."""
    data = _extension._C.FitData(x, target, epochs, batch_size, orders, None, *(val or (None, None)))
    spec = _extension._C.StackSpec(*run.spec)
    if run.kind == "adam":
        return _extension._C.stack_fit_adam_cpu(data, run.params, spec, *run.state, native_hyper(run))
    return _extension._C.stack_fit_sgd_cpu(data, run.params, spec, run.state[0], native_hyper(run))


def emulated_fit(binary, run, x, target, epochs, batch_size, orders, val):
    """The same fit through the emulated kernel: (train losses, val losses, [params then state]),
    fp64 tensors shaped like run's."""
    lines = [f"{run.params[0].element_size()} {0 if run.kind == 'adam' else 1}", *stack_lines(run, x, target)]
    rows_used = orders.shape[1] if orders is not None else x.shape[0]
    batch = min(batch_size, max(rows_used, 1)) if batch_size > 0 else max(rows_used, 1)  # the loops' batch
    lines.append(f"{epochs} {batch} {rows_used} {int(orders is not None)}")
    if orders is not None:
        lines.append(numbers(orders))
    lines += [f"{val[0].shape[0]}", numbers(val[0]), numbers(val[1])] if val else ["-1"]
    rest = run_harness(binary, lines + update_lines(run, first_step=True))
    train, rest = rest[:epochs], rest[epochs:]
    val_count = epochs if val else 0
    val_losses, rest = rest[:val_count], rest[val_count:]
    return train, val_losses, params_and_state(rest, run)


def check(binary, model, criterion, optimizer, dtype, n, epochs, batch_size, rows_per_epoch=None, val_rows=0,
          shuffled=True, seed=0):
    """`epochs` epochs of n rows through the CPU loop and the emulated kernel, both from the same
    values in `dtype`: per-epoch losses, params and state agree within TOLERANCES[dtype]."""
    want = Run(model, criterion, optimizer, "cpu", dtype)
    got = Run(model, criterion, optimizer, "cpu", dtype)
    g = torch.Generator().manual_seed(seed)
    in_features = want.params[want.spec.layer_params[0]].shape[1]
    out = want.params[want.spec.layer_params[-1]].shape[0]

    def rows(count):
        target = make_target(criterion, count, out, g)
        return (torch.randn(count, in_features, generator=g, dtype=torch.float64).to(dtype),
                target.to(dtype) if target.is_floating_point() else target)

    x, target = rows(n)
    val = rows(val_rows) if val_rows else None
    orders = None
    if shuffled:
        orders = torch.stack([torch.randperm(n, generator=g)[:rows_per_epoch or n] for _ in range(epochs)])
    want_train, want_val = cpu_fit(want, x, target, epochs, batch_size, orders, val)
    got_train, got_val, got_tensors = emulated_fit(binary, got, x, target, epochs, batch_size, orders, val)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got_train, want_train.double(), **tol, msg=lambda m: f"train losses: {m}")
    torch.testing.assert_close(got_val, want_val.double(), **tol, msg=lambda m: f"validation losses: {m}")
    expected = want.params + [t for group in want.state for t in group]
    for i, (w, e) in enumerate(zip(expected, got_tensors)):
        torch.testing.assert_close(e, w.double(), **tol, msg=lambda m: f"tensor {i} (params, then state): {m}")


def test_the_tutorial_mlp_with_a_short_last_batch_and_validation(fit_kernel):
    # 70 rows in batches of 32: 32, 32 and 6 rows per epoch, each epoch in a new order.
    torch.manual_seed(0)
    check(fit_kernel, mlp([10, 64, 32, 1], Activation.RELU), nn.MSELoss(), "adam", torch.float32, n=70, epochs=3,
          batch_size=32, val_rows=20)


def test_a_classification_head_with_orders_that_leave_rows_out(fit_kernel):
    # A DataLoader's drop_last: 40 of 45 rows per epoch in batches of 8; cross entropy's mean over
    # the rows not ignored, batch by batch and over the validation set.
    torch.manual_seed(1)
    model = mlp([5, 17, 4], Activation.GELU_TANH)
    check(fit_kernel, model, CRITERIA["cross-entropy"](), "sgd-nesterov-wd", torch.float64, n=45, epochs=2,
          batch_size=8, rows_per_epoch=40, val_rows=13, seed=1)


def test_rows_in_order_as_one_batch_under_a_sum(fit_kernel):
    torch.manual_seed(2)
    model = mlp([3, 7, 2], Activation.TANH, bias=False)
    check(fit_kernel, model, nn.BCEWithLogitsLoss(reduction="sum"), "adam-amsgrad-wd", torch.float64, n=20,
          epochs=3, batch_size=0, shuffled=False, seed=2)
