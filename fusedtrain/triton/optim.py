"""Triton kernels for the optimizer ops ``adam_step_`` and ``sgd_step_``.

Each function has the signature and the in-place effect of its fusedtrain.reference version (the
oracle the tests hold it to): Adam increments every steps[i]; a nonzero found_inf skips the call;
grads are divided by grad_scale and stored back (and only then: without a grad_scale no grad is
written); params and optimizer state are updated.

Design: one kernel launch per call and dtype updates every tensor of that dtype, however many,
and nothing waits for the device: no host synchronization per step or per tensor. The host
builds three small tables that the kernel reads, and copies them from pinned memory without
waiting (fusedtrain.triton._device):

* addresses, int64 (tensors, columns): the data_ptr of each param, its grad and its state
  tensors (0 where the call has none, e.g. max_exp_avg_sq without amsgrad), and for Adam the
  address of the param's step counter and whether it is float64 (else float32). The kernel
  casts an address to a typed pointer and promises the compiler 16-byte alignment, for vector
  loads; tensors that are not contiguous, or not aligned, are staged in contiguous copies that
  are written back after the launch, as the C++ kernels do.
* chunks, int64 (chunks, 2): (tensor index, start offset) of every BLOCK-element chunk of every
  tensor. Program i updates chunk i, so many small tensors fill the GPU as well as one large
  one. A whole chunk runs unmasked and a tensor's last, partial one masked at its numel: a mask
  against a numel loaded from memory would keep the compiler from vectorizing.
* hyperparameters, float64: the call's floats (lr, betas, ...).

Everything that can change between steps is read by the kernel from device memory: the step
counters, grad_scale, found_inf and lr_tensor. Each program folds its coefficients in float64
from them, as make_adam_coeffs / make_sgd_coeffs do on the host for the C++ CPU kernel and on
the device for the CUDA one, and rounds them once into the compute dtype; Adam's bias
corrections come from the program's own tensor's step count, as the counts may differ. A
nonzero found_inf makes every program return at once. Adam's counters are then incremented by
_increment_steps_kernel, launched after every update launch of the call on the same stream, so
that stream order has every update read a counter before it moves (found_inf skips it too).

The element math runs in fp32 for fp32, bf16 and fp16 tensors and in fp64 for fp64 tensors (a
separate specialization), rounded once into the storage dtype. It follows
csrc/include/fusedtrain/adam_math.h and sgd_math.h operation for operation: correctly rounded
square roots and divisions, no FMA contraction, and no term whose coefficient is zero (coupled
weight decay, momentum), since 0 * inf is NaN.

Every launch runs with the tensors' CUDA device made current (a Triton kernel launches on the
current device), so tensors on cuda:1 are updated on cuda:1 whatever device is current.

Under the interpreter (TRITON_INTERPRET=1: the kernels run with numpy on the host) the same
design works unchanged for CPU tensors, with one launch per call and dtype: the interpreter's
int-to-pointer cast is a bitcast of the address and its loads and stores go through raw host
addresses, so a table of data_ptr values serves as well as pointer arguments. It copies only a
kernel's tensor arguments to the host, though, so the addresses of CUDA tensors would point into
device memory: such calls are refused.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedtrain.triton._device import device_guard, host_table, to_device

# Elements per program (one chunk). Read at each call, so tests may shrink it.
BLOCK = 1024
# Step counters per program of _increment_steps_kernel.
_STEPS_BLOCK = 128
# The alignment, in bytes, that the kernels promise the compiler for every tensor they address.
_ALIGN = tl.constexpr(16)

_STORAGE_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
# The address table's columns: Adam's param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, then its
# step counter's address and 1 if that counter is float64 (0: float32); SGD's param, grad,
# momentum_buffer.
_ADAM_COLUMNS = tl.constexpr(7)
_SGD_COLUMNS = tl.constexpr(3)


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
def _step_count(addresses_ptr, tensor):
    """The step counter of row `tensor` of Adam's address table, float32 or float64 in memory, as
    float64: the load of the other kind is masked off, so it touches nothing."""
    address = tl.load(addresses_ptr + tensor * _ADAM_COLUMNS + 5)
    is_float64 = tl.load(addresses_ptr + tensor * _ADAM_COLUMNS + 6) != 0
    as_float64 = tl.load(address.to(tl.pointer_type(tl.float64)), mask=is_float64, other=0.0)
    as_float32 = tl.load(address.to(tl.pointer_type(tl.float32)), mask=~is_float64, other=0.0)
    return tl.where(is_float64, as_float64, as_float32.to(tl.float64))


@triton.jit
def _power(base, exponent):
    """base ** exponent in float64 for base in [0, 1] (Adam's betas), as pow: exp(exponent *
    log(base)), and 0 for a base of 0 without taking log(0)."""
    positive = base > 0.0
    return tl.where(positive, tl.exp(exponent * tl.log(tl.where(positive, base, 1.0))), 0.0)


@triton.jit
def _adam_chunk(addresses_ptr, tensor, offsets, mask, hyper_ptr, lr_ptr, grad_scale_ptr,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr,
                COUPLED_DECAY: tl.constexpr, UNSCALE_GRAD: tl.constexpr):
    # Formulas and order of operations: csrc/include/fusedtrain/adam_math.h (make_adam_coeffs,
    # then adam_element). hyper: see _adam_hyperparameters; lr_ptr: lr_tensor, or hyper, whose
    # first element is the float lr.
    param_ptr = _pointer(addresses_ptr, tensor, 0, _ADAM_COLUMNS, DTYPE) + offsets
    grad_ptr = _pointer(addresses_ptr, tensor, 1, _ADAM_COLUMNS, DTYPE) + offsets
    exp_avg_ptr = _pointer(addresses_ptr, tensor, 2, _ADAM_COLUMNS, DTYPE) + offsets
    exp_avg_sq_ptr = _pointer(addresses_ptr, tensor, 3, _ADAM_COLUMNS, DTYPE) + offsets

    # The coefficients, folded in float64 and rounded once, for step t = the count + 1 (the
    # counters move after the update).
    lr = tl.load(lr_ptr).to(tl.float64)
    beta1_f64 = tl.load(hyper_ptr + 1)
    beta2_f64 = tl.load(hyper_ptr + 2)
    weight_decay_f64 = tl.load(hyper_ptr + 4)
    decoupled = tl.load(hyper_ptr + 5) != 0.0
    t = _step_count(addresses_ptr, tensor) + 1.0
    beta1 = beta1_f64.to(COMPUTE)
    one_minus_beta1 = (1.0 - beta1_f64).to(COMPUTE)
    beta2 = beta2_f64.to(COMPUTE)
    one_minus_beta2 = (1.0 - beta2_f64).to(COMPUTE)
    eps = tl.load(hyper_ptr + 3).to(COMPUTE)
    weight_decay = tl.where(decoupled, 0.0, weight_decay_f64).to(COMPUTE)
    param_decay = tl.where(decoupled, 1.0 - lr * weight_decay_f64, 1.0).to(COMPUTE)
    grad_sign = tl.load(hyper_ptr + 6).to(COMPUTE)
    step_size = (lr / (1.0 - _power(beta1_f64, t))).to(COMPUTE)
    inv_bias_correction2_sqrt = (1.0 / tl.sqrt(1.0 - _power(beta2_f64, t))).to(COMPUTE)

    param = tl.load(param_ptr, mask=mask).to(COMPUTE)
    grad = tl.load(grad_ptr, mask=mask).to(COMPUTE)
    exp_avg = tl.load(exp_avg_ptr, mask=mask).to(COMPUTE)
    exp_avg_sq = tl.load(exp_avg_sq_ptr, mask=mask).to(COMPUTE)
    if UNSCALE_GRAD:
        grad = _div_rn(grad, tl.load(grad_scale_ptr).to(COMPUTE))
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
        max_exp_avg_sq_ptr = _pointer(addresses_ptr, tensor, 4, _ADAM_COLUMNS, DTYPE) + offsets
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
def _adam_program(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr, grad_scale_ptr,
                  DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                  AMSGRAD: tl.constexpr, COUPLED_DECAY: tl.constexpr, UNSCALE_GRAD: tl.constexpr):
    tensor, start, numel = _chunk(chunks_ptr, numels_ptr, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    # A whole chunk goes unmasked: a mask against an arbitrary numel keeps the compiler from
    # vectorizing the loads and stores.
    if start + BLOCK <= numel:
        _adam_chunk(addresses_ptr, tensor, offsets, None, hyper_ptr, lr_ptr, grad_scale_ptr,
                    DTYPE, COMPUTE, AMSGRAD, COUPLED_DECAY, UNSCALE_GRAD)
    else:
        _adam_chunk(addresses_ptr, tensor, offsets, offsets < numel, hyper_ptr, lr_ptr,
                    grad_scale_ptr, DTYPE, COMPUTE, AMSGRAD, COUPLED_DECAY, UNSCALE_GRAD)


@triton.jit
def _adam_kernel(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr, grad_scale_ptr,
                 found_inf_ptr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                 AMSGRAD: tl.constexpr, COUPLED_DECAY: tl.constexpr, UNSCALE_GRAD: tl.constexpr,
                 SKIPPABLE: tl.constexpr):
    # SKIPPABLE: a found_inf is given; nonzero, GradScaler saw an inf or NaN and the step is skipped.
    if SKIPPABLE:
        if tl.load(found_inf_ptr) == 0:
            _adam_program(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr,
                          grad_scale_ptr, DTYPE, COMPUTE, BLOCK, AMSGRAD, COUPLED_DECAY,
                          UNSCALE_GRAD)
    else:
        _adam_program(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr, grad_scale_ptr,
                      DTYPE, COMPUTE, BLOCK, AMSGRAD, COUPLED_DECAY, UNSCALE_GRAD)


@triton.jit
def _increment_steps(steps_ptr, count, BLOCK: tl.constexpr):
    # steps: (count, 2) int64, a counter's address and 1 if it is float64 (0: float32). Atomic
    # adds, so that a counter listed twice counts twice, as in the reference.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < count
    address = tl.load(steps_ptr + 2 * rows, mask=in_range, other=0)
    is_float64 = tl.load(steps_ptr + 2 * rows + 1, mask=in_range, other=0) != 0
    tl.atomic_add(address.to(tl.pointer_type(tl.float64)), 1.0, mask=in_range & is_float64)
    tl.atomic_add(address.to(tl.pointer_type(tl.float32)), 1.0, mask=in_range & ~is_float64)


@triton.jit
def _increment_steps_kernel(steps_ptr, count, found_inf_ptr, SKIPPABLE: tl.constexpr,
                            BLOCK: tl.constexpr):
    if SKIPPABLE:
        if tl.load(found_inf_ptr) == 0:
            _increment_steps(steps_ptr, count, BLOCK)
    else:
        _increment_steps(steps_ptr, count, BLOCK)


@triton.jit
def _sgd_chunk(addresses_ptr, tensor, offsets, mask, hyper_ptr, lr_ptr, grad_scale_ptr,
               DTYPE: tl.constexpr, COMPUTE: tl.constexpr, DECAY: tl.constexpr,
               MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
               UNSCALE_GRAD: tl.constexpr):
    # Formulas and order of operations: csrc/include/fusedtrain/sgd_math.h (make_sgd_coeffs,
    # then sgd_element). hyper: see _sgd_hyperparameters; lr_ptr as in _adam_chunk.
    param_ptr = _pointer(addresses_ptr, tensor, 0, _SGD_COLUMNS, DTYPE) + offsets
    grad_ptr = _pointer(addresses_ptr, tensor, 1, _SGD_COLUMNS, DTYPE) + offsets
    lr = tl.load(lr_ptr).to(tl.float64).to(COMPUTE)
    momentum = tl.load(hyper_ptr + 1).to(COMPUTE)
    one_minus_dampening = tl.load(hyper_ptr + 2).to(COMPUTE)
    weight_decay = tl.load(hyper_ptr + 3).to(COMPUTE)
    grad_sign = tl.load(hyper_ptr + 4).to(COMPUTE)

    param = tl.load(param_ptr, mask=mask).to(COMPUTE)
    grad = tl.load(grad_ptr, mask=mask).to(COMPUTE)
    if UNSCALE_GRAD:
        grad = _div_rn(grad, tl.load(grad_scale_ptr).to(COMPUTE))
        tl.store(grad_ptr, grad.to(DTYPE), mask=mask)

    g = grad_sign * grad
    if DECAY:
        g = g + weight_decay * param
    if MOMENTUM:
        buffer_ptr = _pointer(addresses_ptr, tensor, 2, _SGD_COLUMNS, DTYPE) + offsets
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
def _sgd_program(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr, grad_scale_ptr,
                 DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                 DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
                 NESTEROV: tl.constexpr, UNSCALE_GRAD: tl.constexpr):
    tensor, start, numel = _chunk(chunks_ptr, numels_ptr, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    # Whole chunks unmasked, so that loads and stores vectorize (see _adam_program).
    if start + BLOCK <= numel:
        _sgd_chunk(addresses_ptr, tensor, offsets, None, hyper_ptr, lr_ptr, grad_scale_ptr,
                   DTYPE, COMPUTE, DECAY, MOMENTUM, FIRST_STEP, NESTEROV, UNSCALE_GRAD)
    else:
        _sgd_chunk(addresses_ptr, tensor, offsets, offsets < numel, hyper_ptr, lr_ptr,
                   grad_scale_ptr, DTYPE, COMPUTE, DECAY, MOMENTUM, FIRST_STEP, NESTEROV,
                   UNSCALE_GRAD)


@triton.jit
def _sgd_kernel(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr, grad_scale_ptr,
                found_inf_ptr, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
                NESTEROV: tl.constexpr, UNSCALE_GRAD: tl.constexpr, SKIPPABLE: tl.constexpr):
    # SKIPPABLE as in _adam_kernel.
    if SKIPPABLE:
        if tl.load(found_inf_ptr) == 0:
            _sgd_program(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr,
                         grad_scale_ptr, DTYPE, COMPUTE, BLOCK, DECAY, MOMENTUM, FIRST_STEP,
                         NESTEROV, UNSCALE_GRAD)
    else:
        _sgd_program(addresses_ptr, numels_ptr, chunks_ptr, hyper_ptr, lr_ptr, grad_scale_ptr,
                     DTYPE, COMPUTE, BLOCK, DECAY, MOMENTUM, FIRST_STEP, NESTEROV, UNSCALE_GRAD)


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


def _check_steps(params: list[Tensor], steps: list[Tensor]) -> None:
    """Adam's step counters, which the kernels read and increment where the params are."""
    if len(steps) != len(params):
        raise ValueError(f"steps has {len(steps)} tensors for {len(params)} params")
    for i, (param, step) in enumerate(zip(params, steps)):
        if step.numel() != 1:
            raise ValueError(f"steps[{i}] must have one element, got shape {tuple(step.shape)}")
        if step.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"steps[{i}] must be float32 or float64, got {step.dtype}")
        if step.device != param.device:
            raise ValueError(f"steps[{i}] is on {step.device} but params[{i}] is on "
                             f"{param.device}: the kernels read and increment it there")


def _check_device_scalars(devices: set[torch.device], **scalars: Tensor | None) -> None:
    """grad_scale, found_inf and lr_tensor: one floating-point element, on the device of every
    param (the kernels read them there); lr_tensor may also be on the CPU, where reading it does
    not wait for any device."""
    for name, t in scalars.items():
        if t is None:
            continue
        if t.numel() != 1:
            raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        elsewhere = [d for d in devices if d != t.device]
        if elsewhere and not (name == "lr_tensor" and t.device.type == "cpu"):
            raise ValueError(f"{name} is on {t.device} but params are on {elsewhere[0]}: the "
                             "kernels read it on the params' device")


class _DeviceScalars:
    """The kernels' scalar arguments on one device: the float64 hyperparameter table and the
    pointers to lr, grad_scale and found_inf. An absent tensor is replaced by the table, a valid
    address its flag keeps the kernel from reading (lr: the table's first element is the float
    lr)."""

    def __init__(self, device: torch.device, hyper: list[float], lr: float,
                 lr_tensor: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None):
        on_device = lr_tensor is not None and lr_tensor.device == device
        if lr_tensor is not None and not on_device:  # on the CPU (checked): read for free
            lr = float(lr_tensor)
        self.hyper = host_table([lr, *hyper], torch.float64, device)
        self.lr = lr_tensor if on_device else self.hyper
        self.grad_scale = self.hyper if grad_scale is None else grad_scale
        self.found_inf = self.hyper if found_inf is None else found_inf
        self.flags = dict(UNSCALE_GRAD=grad_scale is not None, SKIPPABLE=found_inf is not None)

    def pointers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.hyper, self.lr, self.grad_scale, self.found_inf


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


def _step_row(step: Tensor) -> list[int]:
    """A step counter as the kernels address it: its address and 1 if it is float64."""
    return [step.data_ptr(), int(step.dtype == torch.float64)]


def _launch(kernel, rows: list[list[Tensor | None]], written: list[bool],
            extra_columns: list[list[int]], scalars: _DeviceScalars, **flags) -> None:
    """Runs `kernel` once over every element of `rows`, then writes staged copies back.

    rows: one per param of a (device, dtype) group: the param, its grad and its state tensors,
    None where absent. written[k]: whether the kernel stores into column k. extra_columns: per
    row, what follows the addresses in the address table (Adam's step counter).
    """
    param = rows[0][0]
    device = param.device
    work = [[None if t is None else _addressable(t) for t in row] for row in rows]
    numels = torch.tensor([row[0].numel() for row in rows], dtype=torch.int64)
    chunks = _chunk_table(numels)
    if len(chunks) > 0:
        addresses = [[0 if t is None else t.data_ptr() for t in row] + extra
                     for row, extra in zip(work, extra_columns)]
        kernel[(len(chunks),)](
            host_table(addresses, torch.int64, device), to_device(numels, device),
            to_device(chunks, device), *scalars.pointers(),
            DTYPE=_STORAGE_DTYPES[param.dtype],
            COMPUTE=_STORAGE_DTYPES[_compute_dtype(param.dtype)],
            BLOCK=BLOCK, enable_fp_fusion=False, **scalars.flags, **flags)
    for row, work_row in zip(rows, work):
        for t, w, stored in zip(row, work_row, written):
            if stored and w is not t:
                t.copy_(w)


def _adam_hyperparameters(beta1, beta2, eps, weight_decay, decoupled, maximize) -> list[float]:
    """What make_adam_coeffs (adam_math.h) folds besides lr and the step count, in the order that
    _adam_chunk loads them after lr."""
    return [beta1, beta2, eps, weight_decay, float(decoupled), -1.0 if maximize else 1.0]


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
    rows = [[p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None]
            for i, p in enumerate(params)]
    groups = _groups(rows)
    _check_steps(params, steps)
    devices = {p.device for p in params}
    _check_device_scalars(devices, grad_scale=grad_scale, found_inf=found_inf,
                          lr_tensor=lr_tensor)
    hyper = _adam_hyperparameters(beta1, beta2, eps, weight_decay, decoupled, maximize)
    for device in devices:
        with device_guard(device):
            scalars = _DeviceScalars(device, hyper, lr, lr_tensor, grad_scale, found_inf)
            for (group_device, _), indices in groups.items():
                if group_device == device:
                    _launch(_adam_kernel, [rows[i] for i in indices],
                            written=[True, grad_scale is not None, True, True, True],
                            extra_columns=[_step_row(steps[i]) for i in indices],
                            scalars=scalars, AMSGRAD=amsgrad,
                            COUPLED_DECAY=weight_decay != 0 and not decoupled)
            # After every update launch on this device's stream, which read the counters.
            counters = [_step_row(step) for step in steps if step.device == device]
            _increment_steps_kernel[(triton.cdiv(len(counters), _STEPS_BLOCK),)](
                host_table(counters, torch.int64, device), len(counters), scalars.found_inf,
                SKIPPABLE=scalars.flags["SKIPPABLE"], BLOCK=_STEPS_BLOCK, enable_fp_fusion=False)


def _sgd_hyperparameters(momentum, dampening, weight_decay, maximize) -> list[float]:
    """make_sgd_coeffs (sgd_math.h) besides lr, in the order that _sgd_chunk loads them after lr."""
    return [momentum, 1.0 - dampening, weight_decay, -1.0 if maximize else 1.0]


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
    rows = [[p, grads[i], momentum_buffers[i] if momentum != 0 else None]
            for i, p in enumerate(params)]
    groups = _groups(rows)
    devices = {p.device for p in params}
    _check_device_scalars(devices, grad_scale=grad_scale, found_inf=found_inf,
                          lr_tensor=lr_tensor)
    hyper = _sgd_hyperparameters(momentum, dampening, weight_decay, maximize)
    for device in devices:
        with device_guard(device):
            scalars = _DeviceScalars(device, hyper, lr, lr_tensor, grad_scale, found_inf)
            for (group_device, _), indices in groups.items():
                if group_device == device:
                    _launch(_sgd_kernel, [rows[i] for i in indices],
                            written=[True, grad_scale is not None, True],
                            extra_columns=[[] for _ in indices], scalars=scalars,
                            DECAY=weight_decay != 0, MOMENTUM=momentum != 0,
                            FIRST_STEP=first_step, NESTEROV=nesterov)
