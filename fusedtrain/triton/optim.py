"""Triton kernels for the optimizer ops ``adam_step_`` and ``sgd_step_``.

Each function has the signature and the in-place effect of its fusedtrain.reference version (the
oracle the tests hold it to): Adam increments every steps[i]; a nonzero found_inf skips the call;
grads are divided by grad_scale and stored back; params and optimizer state are updated.

Design: one kernel launch per call and dtype updates every tensor of that dtype, however many.
The host builds three small tables that the kernel reads:

* addresses, int64 (tensors, columns): the data_ptr of each param, its grad and its state
  tensors (0 where the call has none, e.g. max_exp_avg_sq without amsgrad). The kernel casts an
  address to a typed pointer and promises the compiler 16-byte alignment, for vector loads;
  tensors that are not contiguous, or not aligned, are staged in contiguous copies that are
  written back after the launch, as the C++ kernels do.
* chunks, int64 (chunks, 2): (tensor index, start offset) of every BLOCK-element chunk of every
  tensor. Program i updates chunk i, so many small tensors fill the GPU as well as one large
  one. A whole chunk runs unmasked and a tensor's last, partial one masked at its numel: a mask
  against a numel loaded from memory would keep the compiler from vectorizing.
* coefficients, in the compute dtype: the hyperparameters folded on the host in double, as
  make_adam_coeffs / make_sgd_coeffs do, and rounded once; for Adam also each tensor's bias
  corrections, as the tensors' step counts may differ.

The element math runs in fp32 for fp32, bf16 and fp16 tensors and in fp64 for fp64 tensors (a
separate specialization), rounded once into the storage dtype. It follows
csrc/include/fusedtrain/adam_math.h and sgd_math.h operation for operation: correctly rounded
square roots and divisions, no FMA contraction, and no term whose coefficient is zero (coupled
weight decay, momentum), since 0 * inf is NaN.

Under the interpreter (TRITON_INTERPRET=1: the kernels run with numpy on the host) the same
design works unchanged for CPU tensors, with one launch per call and dtype: the interpreter's
int-to-pointer cast is a bitcast of the address and its loads and stores go through raw host
addresses, so a table of data_ptr values serves as well as pointer arguments. It copies only a
kernel's tensor arguments to the host, though, so the addresses of CUDA tensors would point into
device memory: such calls are refused.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements per program (one chunk). Read at each call, so tests may shrink it.
BLOCK = 1024
# The alignment, in bytes, that the kernels promise the compiler for every tensor they address.
_ALIGN = tl.constexpr(16)

_STORAGE_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


@triton.jit
def _chunk(chunks_ptr, numels_ptr, BLOCK: tl.constexpr):
    """This program's chunk: its tensor's index, the chunk's start offset and the tensor's numel."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunks_ptr + 2 * chunk)
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * chunk + 1), BLOCK)
    return tensor, start, tl.load(numels_ptr + tensor)


@triton.jit
def _pointer(addresses_ptr, tensor, column: tl.constexpr, COLUMNS: tl.constexpr,
             DTYPE: tl.constexpr):
    """The address in row `tensor`, column `column` of the table, as a pointer to DTYPE."""
    address = tl.load(addresses_ptr + tensor * COLUMNS + column)
    return tl.multiple_of(address.to(tl.pointer_type(DTYPE)), _ALIGN)


# Correctly rounded square root and division, as in C++: for fp32, tl.sqrt and `/` are
# approximate on GPUs; for fp64 they are exact, and the *_rn functions take fp32 only.
@triton.jit
def _sqrt_rn(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div_rn(x, y):
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _adam_chunk(addresses_ptr, tensor, offsets, mask, bias_corrections_ptr, hyper_ptr,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr,
                COUPLED_DECAY: tl.constexpr, UNSCALE_GRAD: tl.constexpr):
    # Formulas and order of operations: csrc/include/fusedtrain/adam_math.h (adam_element).
    # addresses columns: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq.
    param_ptr = _pointer(addresses_ptr, tensor, 0, 5, DTYPE) + offsets
    grad_ptr = _pointer(addresses_ptr, tensor, 1, 5, DTYPE) + offsets
    exp_avg_ptr = _pointer(addresses_ptr, tensor, 2, 5, DTYPE) + offsets
    exp_avg_sq_ptr = _pointer(addresses_ptr, tensor, 3, 5, DTYPE) + offsets
    # hyper: see _adam_hyperparameters; bias_corrections: one (step_size, inv_bc2_sqrt) per tensor.
    beta1 = tl.load(hyper_ptr + 0)
    one_minus_beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    one_minus_beta2 = tl.load(hyper_ptr + 3)
    eps = tl.load(hyper_ptr + 4)
    weight_decay = tl.load(hyper_ptr + 5)
    param_decay = tl.load(hyper_ptr + 6)
    grad_sign = tl.load(hyper_ptr + 7)
    grad_scale = tl.load(hyper_ptr + 8)
    step_size = tl.load(bias_corrections_ptr + 2 * tensor)
    inv_bias_correction2_sqrt = tl.load(bias_corrections_ptr + 2 * tensor + 1)

    param = tl.load(param_ptr, mask=mask).to(COMPUTE)
    grad = tl.load(grad_ptr, mask=mask).to(COMPUTE)
    exp_avg = tl.load(exp_avg_ptr, mask=mask).to(COMPUTE)
    exp_avg_sq = tl.load(exp_avg_sq_ptr, mask=mask).to(COMPUTE)
    if UNSCALE_GRAD:
        grad = _div_rn(grad, grad_scale)
        tl.store(grad_ptr, grad.to(DTYPE), mask=mask)

    g = grad_sign * grad
    if COUPLED_DECAY:
        g = g + weight_decay * param
    p = param * param_decay
    # torch.lerp(exp_avg, g, 1 - beta1), which switches ends for weights >= 0.5
    exp_avg = tl.where(one_minus_beta1 < 0.5,
                       exp_avg + one_minus_beta1 * (g - exp_avg),
                       g - (g - exp_avg) * (1.0 - one_minus_beta1))
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq_ptr = _pointer(addresses_ptr, tensor, 4, 5, DTYPE) + offsets
        max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr, mask=mask).to(COMPUTE)
        # torch.maximum: NaN from either side wins
        keep = (max_exp_avg_sq != max_exp_avg_sq) | (max_exp_avg_sq > exp_avg_sq)
        max_exp_avg_sq = tl.where(keep, max_exp_avg_sq, exp_avg_sq)
        tl.store(max_exp_avg_sq_ptr, max_exp_avg_sq.to(DTYPE), mask=mask)
        second_moment = max_exp_avg_sq
    denom = _sqrt_rn(second_moment) * inv_bias_correction2_sqrt + eps
    param = p - _div_rn(step_size * exp_avg, denom)

    tl.store(param_ptr, param.to(DTYPE), mask=mask)
    tl.store(exp_avg_ptr, exp_avg.to(DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr, exp_avg_sq.to(DTYPE), mask=mask)


@triton.jit
def _adam_kernel(addresses_ptr, numels_ptr, chunks_ptr, bias_corrections_ptr, hyper_ptr,
                 DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                 AMSGRAD: tl.constexpr, COUPLED_DECAY: tl.constexpr, UNSCALE_GRAD: tl.constexpr):
    tensor, start, numel = _chunk(chunks_ptr, numels_ptr, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    # A whole chunk goes unmasked: a mask against an arbitrary numel keeps the compiler from
    # vectorizing the loads and stores.
    if start + BLOCK <= numel:
        _adam_chunk(addresses_ptr, tensor, offsets, None, bias_corrections_ptr, hyper_ptr,
                    DTYPE, COMPUTE, AMSGRAD, COUPLED_DECAY, UNSCALE_GRAD)
    else:
        _adam_chunk(addresses_ptr, tensor, offsets, offsets < numel, bias_corrections_ptr,
                    hyper_ptr, DTYPE, COMPUTE, AMSGRAD, COUPLED_DECAY, UNSCALE_GRAD)


@triton.jit
def _sgd_chunk(addresses_ptr, tensor, offsets, mask, hyper_ptr,
               DTYPE: tl.constexpr, COMPUTE: tl.constexpr, DECAY: tl.constexpr,
               MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
               UNSCALE_GRAD: tl.constexpr):
    # Formulas and order of operations: csrc/include/fusedtrain/sgd_math.h (sgd_element).
    # addresses columns: param, grad, momentum_buffer.
    param_ptr = _pointer(addresses_ptr, tensor, 0, 3, DTYPE) + offsets
    grad_ptr = _pointer(addresses_ptr, tensor, 1, 3, DTYPE) + offsets
    # hyper: see _sgd_hyperparameters.
    lr = tl.load(hyper_ptr + 0)
    momentum = tl.load(hyper_ptr + 1)
    one_minus_dampening = tl.load(hyper_ptr + 2)
    weight_decay = tl.load(hyper_ptr + 3)
    grad_sign = tl.load(hyper_ptr + 4)
    grad_scale = tl.load(hyper_ptr + 5)

    param = tl.load(param_ptr, mask=mask).to(COMPUTE)
    grad = tl.load(grad_ptr, mask=mask).to(COMPUTE)
    if UNSCALE_GRAD:
        grad = _div_rn(grad, grad_scale)
        tl.store(grad_ptr, grad.to(DTYPE), mask=mask)

    g = grad_sign * grad
    if DECAY:
        g = g + weight_decay * param
    if MOMENTUM:
        buffer_ptr = _pointer(addresses_ptr, tensor, 2, 3, DTYPE) + offsets
        if FIRST_STEP:
            buffer = g
        else:
            buffer = tl.load(buffer_ptr, mask=mask).to(COMPUTE) * momentum + one_minus_dampening * g
        tl.store(buffer_ptr, buffer.to(DTYPE), mask=mask)
        if NESTEROV:
            g = g + momentum * buffer
        else:
            g = buffer
    param = param - lr * g
    tl.store(param_ptr, param.to(DTYPE), mask=mask)


@triton.jit
def _sgd_kernel(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
                NESTEROV: tl.constexpr, UNSCALE_GRAD: tl.constexpr):
    tensor, start, numel = _chunk(chunks_ptr, numels_ptr, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    # Whole chunks unmasked, so that loads and stores vectorize (see _adam_kernel).
    if start + BLOCK <= numel:
        _sgd_chunk(addresses_ptr, tensor, offsets, None, hyper_ptr,
                   DTYPE, COMPUTE, DECAY, MOMENTUM, FIRST_STEP, NESTEROV, UNSCALE_GRAD)
    else:
        _sgd_chunk(addresses_ptr, tensor, offsets, offsets < numel, hyper_ptr,
                   DTYPE, COMPUTE, DECAY, MOMENTUM, FIRST_STEP, NESTEROV, UNSCALE_GRAD)


def _skipped(found_inf: Tensor | None) -> bool:
    return found_inf is not None and found_inf.item() != 0


def _lr_value(lr: float, lr_tensor: Tensor | None) -> float:
    """The learning rate: the coefficient tables are built on the host, so a tensor lr is read
    there (these kernels are not for CUDA graph capture)."""
    return lr if lr_tensor is None else lr_tensor.item()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(rows: list[list[Tensor | None]]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the rows (param, grad, state...; None where absent), by the param's device and
    dtype: one launch each. Checks every row first, so that a refused call changes nothing."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (param, *others) in enumerate(rows):
        if triton.knobs.runtime.interpret and param.device.type != "cpu":
            raise RuntimeError(f"params[{i}] is on {param.device}: under TRITON_INTERPRET=1 the "
                               "kernels run on CPU tensors only, since the interpreter reads "
                               "their table of data_ptr values as host addresses")
        if param.dtype not in _STORAGE_DTYPES:
            raise TypeError(f"params[{i}] has dtype {param.dtype}, expected float32, float64, "
                            "bfloat16 or float16")
        for t in others:
            if t is not None and (t.shape, t.dtype, t.device) != (param.shape, param.dtype,
                                                                   param.device):
                raise ValueError(f"a tensor of shape {tuple(t.shape)}, {t.dtype} on {t.device} "
                                 f"goes with params[{i}] of shape {tuple(param.shape)}, "
                                 f"{param.dtype} on {param.device}: they must agree")
        groups.setdefault((param.device, param.dtype), []).append(i)
    return groups


def _addressable(t: Tensor) -> Tensor:
    """`t`, or a contiguous, aligned copy of it if the kernel cannot address it directly."""
    if t.is_contiguous() and t.data_ptr() % _ALIGN.value == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _chunk_table(numels: Tensor) -> Tensor:
    """(tensor index, start offset) of every BLOCK-element chunk of tensors of `numels` elements."""
    counts = (numels + BLOCK - 1) // BLOCK
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    start = (torch.arange(len(tensor)) - first_chunk[tensor]) * BLOCK
    return torch.stack([tensor, start], dim=1)


def _launch(kernel, rows: list[list[Tensor | None]], written: list[bool],
            coefficients: list[Tensor], **flags) -> None:
    """Runs `kernel` once over every element of `rows`, then writes staged copies back.

    rows: one per param of a (device, dtype) group: the param, its grad and its state tensors,
    None where absent. written[k]: whether the kernel stores into column k.
    coefficients: the kernel's float tables, in the compute dtype, on the host.
    """
    param = rows[0][0]
    work = [[None if t is None else _addressable(t) for t in row] for row in rows]
    numels = torch.tensor([row[0].numel() for row in rows], dtype=torch.int64)
    chunks = _chunk_table(numels)
    if len(chunks) > 0:
        addresses = torch.tensor([[0 if t is None else t.data_ptr() for t in row] for row in work],
                                 dtype=torch.int64)
        device = param.device
        kernel[(len(chunks),)](
            addresses.to(device), numels.to(device), chunks.to(device),
            *(c.to(device) for c in coefficients),
            DTYPE=_STORAGE_DTYPES[param.dtype],
            COMPUTE=_STORAGE_DTYPES[_compute_dtype(param.dtype)],
            BLOCK=BLOCK, enable_fp_fusion=False, **flags)
    for row, work_row in zip(rows, work):
        for t, w, stored in zip(row, work_row, written):
            if stored and w is not t:
                t.copy_(w)


def _adam_hyperparameters(lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                          grad_scale) -> list[float]:
    """The step-independent part of make_adam_coeffs (adam_math.h), in the order that
    _adam_kernel loads them, and the grad scale."""
    return [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
            0.0 if decoupled else weight_decay,
            1.0 - lr * weight_decay if decoupled else 1.0,
            -1.0 if maximize else 1.0,
            grad_scale]


def _adam_bias_corrections(lr, beta1, beta2, step) -> list[float]:
    """make_adam_coeffs' step_size and inv_bias_correction2_sqrt for step count `step`."""
    return [lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step)]


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
    """Adam (decoupled=False) or AdamW (decoupled=True), one step, in place: see
    fusedtrain.reference.adam_step_."""
    if _skipped(found_inf):
        return
    lr = _lr_value(lr, lr_tensor)
    rows = [[p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None]
            for i, p in enumerate(params)]
    groups = _groups(rows)
    for step in steps:
        step.add_(1)
    scale = 1.0 if grad_scale is None else grad_scale.item()
    hyper = _adam_hyperparameters(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, scale)
    for (_, dtype), indices in groups.items():
        compute = _compute_dtype(dtype)
        bias_corrections = [_adam_bias_corrections(lr, beta1, beta2, steps[i].item())
                            for i in indices]
        _launch(_adam_kernel, [rows[i] for i in indices],
                written=[True, grad_scale is not None, True, True, True],
                coefficients=[torch.tensor(bias_corrections, dtype=compute),
                              torch.tensor(hyper, dtype=compute)],
                AMSGRAD=amsgrad, COUPLED_DECAY=weight_decay != 0 and not decoupled,
                UNSCALE_GRAD=grad_scale is not None)


def _sgd_hyperparameters(lr, momentum, dampening, weight_decay, maximize,
                         grad_scale) -> list[float]:
    """make_sgd_coeffs (sgd_math.h), in the order that _sgd_kernel loads them, and the grad
    scale."""
    return [lr, momentum, 1.0 - dampening, weight_decay, -1.0 if maximize else 1.0, grad_scale]


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
    """SGD, one step, in place: see fusedtrain.reference.sgd_step_."""
    if _skipped(found_inf):
        return
    lr = _lr_value(lr, lr_tensor)
    rows = [[p, grads[i], momentum_buffers[i] if momentum != 0 else None]
            for i, p in enumerate(params)]
    groups = _groups(rows)
    scale = 1.0 if grad_scale is None else grad_scale.item()
    hyper = _sgd_hyperparameters(lr, momentum, dampening, weight_decay, maximize, scale)
    for (_, dtype), indices in groups.items():
        _launch(_sgd_kernel, [rows[i] for i in indices],
                written=[True, grad_scale is not None, True],
                coefficients=[torch.tensor(hyper, dtype=_compute_dtype(dtype))],
                DECAY=weight_decay != 0, MOMENTUM=momentum != 0, FIRST_STEP=first_step,
                NESTEROV=nesterov, UNSCALE_GRAD=grad_scale is not None)
