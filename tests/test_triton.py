"""The Triton optimizer kernels (fusedtrain.triton) against fusedtrain.reference: on CPU tensors
under the Triton interpreter, and compiled on CUDA tensors where a GPU is present.

TRITON_INTERPRET=1 must be set before triton is imported, so each test runs this file as a
script in a fresh process, with its working directory outside the checkout so that the installed
package is the one imported. The script runs a batch of checks and fails on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from helpers import run_triton_checks

pytest.importorskip("triton")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _run_checks(*args: str, device: str = "cpu") -> None:
    run_triton_checks(__file__, *args, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_reference(dtype):
    _run_checks("adam", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_matches_reference(dtype):
    _run_checks("sgd", dtype)


def test_mixed_dtypes_empty_and_refused_calls():
    _run_checks("mixed")


def test_lr_tensor_and_grads_without_grad_scale():
    _run_checks("scalars")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_compiled_kernels_on_cuda_match_reference(op):
    _run_checks(op, *DTYPES, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernels_on_cuda_never_wait_for_the_device():
    _run_checks("scalars", device="cuda")


# ---- The checks, run in the subprocess ------------------------------------------------------

# The kernels' chunk size during the checks: small, so that tensors span several chunks.
BLOCK = 128
# (shape, layout of the param and its state, layout of the grad). "transposed": a transposed view;
# "offset": a view one element into its buffer, contiguous but not 16-byte aligned. Either is
# staged through a contiguous copy. Sizes: a multiple of BLOCK, others, a 0-dim and an empty one.
TENSORS = [
    ((300,), "contiguous", "contiguous"),
    ((), "contiguous", "contiguous"),
    ((0, 3), "contiguous", "contiguous"),
    ((2 * BLOCK,), "contiguous", "contiguous"),
    ((17, 9), "transposed", "transposed"),
    ((5, 4, 3), "contiguous", "transposed"),
    ((131,), "offset", "contiguous"),
    ((257,), "contiguous", "offset"),
]

ADAM_DEFAULTS = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
                     amsgrad=False, maximize=False)
ADAM_CONFIGS = {
    "default": {},
    "weight_decay coupled": dict(weight_decay=0.1),
    "weight_decay decoupled": dict(weight_decay=0.1, decoupled=True, lr=1e-2),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True, weight_decay=0.1),
    "beta1 < 0.5 (lerp's other branch)": dict(beta1=0.3),
    "grad_scale": dict(grad_scale=3.0, found_inf=0.0, amsgrad=True),
    "found_inf": dict(grad_scale=3.0, found_inf=1.0),
}
SGD_DEFAULTS = dict(lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False, first_step=False)
SGD_CONFIGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "first_step": dict(momentum=0.9, first_step=True),
    "first_step nesterov": dict(momentum=0.9, first_step=True, nesterov=True),
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(maximize=True, momentum=0.9, weight_decay=0.1),
    "grad_scale": dict(grad_scale=3.0, found_inf=0.0, momentum=0.9),
    "found_inf": dict(grad_scale=3.0, found_inf=1.0, momentum=0.9),
}


def _tolerance(dtype: torch.dtype) -> dict:
    # bf16 results are an ulp (2^-8) apart where they round differently: the interpreter converts
    # fp32 to bf16 by truncation, torch (and a GPU) to nearest. fp16 converts to nearest in both,
    # so the defaults hold it, as they do fp32 and fp64.
    return dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else {}


def _tensor(shape, layout, dtype, device, gen, scale=1.0, positive=False):
    """Fresh random values (drawn in fp64 on the CPU, then rounded) in the given layout."""
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    values = (values.abs() if positive else values).to(device, dtype)
    if layout == "transposed":
        return values.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "offset":
        buffer = torch.empty(values.numel() + 1, dtype=dtype, device=device)
        buffer[1:] = values.reshape(-1)
        return buffer[1:].view(shape)
    return values


def _make_args(op: str, dtype: torch.dtype, seed: int, tensors=TENSORS, nonfinite=True,
               device="cpu") -> list[list[torch.Tensor]]:
    """Lists of tensors for the op (params, grads, state..., steps); with `nonfinite`, an inf
    param and NaN and -inf grads in the first tensor (a vector)."""
    gen = torch.Generator().manual_seed(seed)
    params = [_tensor(s, lay, dtype, device, gen) for s, lay, _ in tensors]
    grads = [_tensor(s, lay, dtype, device, gen) for s, _, lay in tensors]
    if nonfinite:
        # A zero coefficient must drop its term: 0 * inf would turn the inf param into NaN.
        params[0][0] = float("inf")
        grads[0][1], grads[0][2] = float("nan"), -float("inf")
    if op == "sgd":
        return [params, grads, [_tensor(s, lay, dtype, device, gen, 0.1) for s, lay, _ in tensors]]
    exp_avgs = [_tensor(s, lay, dtype, device, gen, 0.1) for s, lay, _ in tensors]
    exp_avg_sqs = [_tensor(s, lay, dtype, device, gen, 0.01, True) for s, lay, _ in tensors]
    max_exp_avg_sqs = [_tensor(s, lay, dtype, device, gen, 0.01, True) for s, lay, _ in tensors]
    # The tensors' step counts differ, and so do their bias corrections.
    steps = [torch.tensor(float(3 * k), dtype=torch.float64 if k == 1 else torch.float32,
                          device=device) for k in range(len(tensors))]
    return [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps]


def _call(op_fn, op: str, args, config: dict) -> None:
    kwargs = dict(ADAM_DEFAULTS if op == "adam" else SGD_DEFAULTS, **config)
    device = args[0][0].device if args[0] else "cpu"
    for name in ("grad_scale", "found_inf"):
        if name in kwargs:  # on the params' device, where the kernels read them
            kwargs[name] = torch.tensor(kwargs[name], device=device)
    if op == "adam":
        if not kwargs["amsgrad"]:
            args = args[:4] + [[]] + args[5:]  # the ops take no max_exp_avg_sqs without amsgrad
        op_fn(*args, **kwargs)
    else:
        if kwargs["momentum"] == 0:
            args = args[:2] + [[]]  # nor momentum_buffers without momentum
        if kwargs["first_step"]:  # the buffers must not be read, only written
            for buffer in args[2]:
                buffer.fill_(float("nan"))
        op_fn(*args, **kwargs)


def _assert_same(label: str, got, want, dtype: torch.dtype) -> None:
    for k, (got_list, want_list) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(got_list, want_list)):
            torch.testing.assert_close(g, w, equal_nan=True, **_tolerance(dtype),
                                       msg=lambda m, k=k, i=i: f"{label}: argument {k}[{i}]: {m}")


class _LaunchCounter:
    """Stands in for a kernel of fusedtrain.triton.optim and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _check_op(op: str, dtype: torch.dtype, device: str) -> None:
    from fusedtrain import reference
    from fusedtrain.triton import optim

    kernel_name = f"_{op}_kernel"
    counter = _LaunchCounter(getattr(optim, kernel_name))
    setattr(optim, kernel_name, counter)
    configs = ADAM_CONFIGS if op == "adam" else SGD_CONFIGS
    for seed, (name, config) in enumerate(configs.items()):
        label = f"{op} {dtype} {device} {name}"
        got = _make_args(op, dtype, seed, device=device)
        want = [[t.clone() for t in lst] for lst in got]
        before = counter.launches
        _call(getattr(optim, f"{op}_step_"), op, got, config)
        _call(getattr(reference, f"{op}_step_"), op, want, config)
        _assert_same(label, got, want, dtype)
        # One launch, found_inf or not: the kernel reads found_inf and returns at once if set.
        assert counter.launches - before == 1, f"{label}: {counter.launches - before} launches"
        print(f"{label}: ok")


def _check_mixed() -> None:
    """One launch per dtype in a call; a call with nothing to update launches nothing; a refused
    call changes nothing."""
    from fusedtrain import reference
    from fusedtrain.triton import optim

    adam_counter = _LaunchCounter(optim._adam_kernel)
    sgd_counter = _LaunchCounter(optim._sgd_kernel)
    optim._adam_kernel, optim._sgd_kernel = adam_counter, sgd_counter
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.bfloat16]
    for op, counter in (("adam", adam_counter), ("sgd", sgd_counter)):
        got = [[] for _ in range(6 if op == "adam" else 3)]
        for k, dtype in enumerate(dtypes):
            for lst, t in zip(got, _make_args(op, dtype, k, TENSORS[k:k + 2], nonfinite=False)):
                lst.extend(t)
        want = [[t.clone() for t in lst] for lst in got]
        config = dict(amsgrad=True) if op == "adam" else dict(momentum=0.9)
        _call(getattr(optim, f"{op}_step_"), op, got, config)
        _call(getattr(reference, f"{op}_step_"), op, want, config)
        for k, dtype in enumerate(dtypes):  # each dtype at its own tolerance
            pick = slice(2 * k, 2 * k + 2)
            _assert_same(f"{op} mixed dtypes ({dtype})", [lst[pick] for lst in got],
                         [lst[pick] for lst in want], dtype)
        assert counter.launches == 3, f"{op}: {counter.launches} launches for 3 dtypes"

        counter.launches = 0
        empty = _make_args(op, torch.float32, 0, [((0,), "contiguous", "contiguous")],
                           nonfinite=False)
        _call(getattr(optim, f"{op}_step_"), op, empty, config)
        _call(getattr(optim, f"{op}_step_"), op, [[] for _ in empty], config)
        assert counter.launches == 0, f"{op}: launched with no element to update"
        if op == "adam":
            assert empty[5][0].item() == 1.0, "adam: the step of an empty param was not counted"
        print(f"{op} mixed dtypes and empty calls: ok")

    # Refused calls change nothing: a grad of another shape; a param off the CPU.
    args = _make_args("adam", torch.float32, 0, TENSORS[:2], nonfinite=False)
    before = [[t.clone() for t in lst] for lst in args]
    _expect_refusal(ValueError, optim.adam_step_, args[0], [args[1][0], torch.zeros(2)], *args[2:],
                    **ADAM_DEFAULTS)
    _assert_same("refused adam call", args, before, torch.float32)
    meta = [torch.zeros(3, device="meta")]
    _expect_refusal(RuntimeError, optim.sgd_step_, meta, meta, [], **SGD_DEFAULTS)
    print("refused calls: ok")


def _check_scalars(device: str) -> None:
    """lr_tensor replaces the float lr (float32 and float64 ones); grads are left bit for bit as
    they were without a grad_scale (a bf16 NaN with a payload included); on CUDA, a step with
    grad_scale, found_inf and lr_tensor on the device never waits for it (torch's sync debug
    mode turns any synchronization into an error)."""
    from fusedtrain import reference
    from fusedtrain.triton import optim

    for op in ("adam", "sgd"):
        for lr_dtype in (torch.float32, torch.float64):
            lr_tensor = torch.tensor(0.0123, dtype=lr_dtype, device=device)
            config = dict(weight_decay=0.1, decoupled=True) if op == "adam" else \
                dict(momentum=0.9, weight_decay=0.1)
            got = _make_args(op, torch.bfloat16, 3, nonfinite=False, device=device)
            got[1][0].view(torch.int16)[0] = 0x7FA1  # a NaN whose payload fp32 would not keep
            grads_before = [g.clone() for g in got[1]]
            want = [[t.clone() for t in lst] for lst in got]
            _call(getattr(optim, f"{op}_step_"), op, got,
                  dict(config, lr=123.0, lr_tensor=lr_tensor))
            _call(getattr(reference, f"{op}_step_"), op, want, dict(config, lr=lr_tensor.item()))
            label = f"{op} lr_tensor {lr_dtype} {device}"
            _assert_same(label, got, want, torch.bfloat16)
            for g, before in zip(got[1], grads_before):
                assert torch.equal(g.view(torch.int16), before.view(torch.int16)), \
                    f"{label}: a grad was written without a grad_scale"
            print(f"{label}: ok")
    if device == "cuda":
        for op in ("adam", "sgd"):
            args = _make_args(op, torch.float32, 4, nonfinite=False, device=device)
            kwargs = dict(ADAM_DEFAULTS, amsgrad=True) if op == "adam" else \
                dict(SGD_DEFAULTS, momentum=0.9)
            kwargs.update(grad_scale=torch.tensor(4.0, device=device),
                          found_inf=torch.tensor(0.0, device=device),
                          lr_tensor=torch.tensor(0.01, device=device))
            step = getattr(optim, f"{op}_step_")
            step(*args, **kwargs)  # compiles the kernels
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            print(f"{op}: no synchronization with the device")


def _expect_refusal(error: type, op_fn, *args, **kwargs) -> None:
    try:
        op_fn(*args, **kwargs)
    except error as e:
        print(f"refused as expected: {e}")
    else:
        raise AssertionError(f"{op_fn.__name__} did not raise {error.__name__}")


def _main(device: str, what: str, *dtypes: str) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert interpret == (device == "cpu"), "CPU tensors need TRITON_INTERPRET=1, CUDA ones not"
    from fusedtrain.triton import optim

    optim.BLOCK = BLOCK
    if what == "mixed":
        _check_mixed()
    if what == "scalars":
        _check_scalars(device)
    for dtype in dtypes:
        _check_op(what, DTYPES[dtype], device)


if __name__ == "__main__":
    _main(*sys.argv[1:])
