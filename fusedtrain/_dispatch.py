"""Picks the implementation of each op: one table, one place.

Backends:
  "native"     the compiled kernels (torch.ops.fusedtrain; for eager CPU calls the same kernel
               functions bound directly), on the devices this build has kernels for;
  "triton"     fusedtrain.triton, on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1;
  "reference"  plain PyTorch (fusedtrain.reference), anywhere;
  "auto"       the FUSEDTRAIN_BACKEND environment variable if set, else native where built,
               else the reference.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from fusedtrain import _extension, reference

BACKENDS = ("auto", "native", "triton", "reference")
TRITON_OPS = ("adam_step_", "sgd_step_", "linear_mse_fwd_bwd", "stack_fwd_bwd", "stack_adam_step_",
              "stack_sgd_step_")
# Ops whose CPU kernel is also bound in _C as <name without the trailing _>_cpu (see op()).
DIRECT_CPU_BINDINGS = ("adam_step_", "sgd_step_", "linear_mse_fwd_bwd")


def _native_devices() -> tuple[str, ...]:
    if not _extension.native_available():
        return ()
    return ("cpu", "cuda") if _extension._C.has_cuda_kernels() else ("cpu",)


# Device types that have native kernels in this build, and whether triton is installed. Fixed
# at import, which also keeps these calls out of what torch.compile traces.
NATIVE_DEVICES = _native_devices()
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def why_not(backend: str, device: torch.device, name: str | None = None) -> str | None:
    """None if `backend` can run (op `name`, if given) on `device`, else the reason it cannot."""
    if backend == "native":
        if device.type not in NATIVE_DEVICES:
            return ("the compiled extension is not available" if not _extension.native_available()
                    else f"this build has no {device.type} kernels")
    if backend == "triton":
        if name is not None and name not in TRITON_OPS:
            return f"there is no Triton kernel for {name}"
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton has no {device.type} target here"
    return None


def resolve(backend: str, device: torch.device, name: str | None = None) -> str:
    """The concrete backend ("native", "triton" or "reference") that runs op `name` (any op, if
    None) on `device`."""
    check_backend(backend)
    if backend == "auto":
        backend = os.environ.get("FUSEDTRAIN_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FUSEDTRAIN_BACKEND must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            return "native" if why_not("native", device, name) is None else "reference"
    reason = why_not(backend, device, name)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def op(name: str, backend: str, device: torch.device) -> Callable[..., None]:
    """The callable implementing op `name` for `backend` on `device`."""
    chosen = resolve(backend, device, name)
    if chosen == "reference":
        return getattr(reference, name)
    if chosen == "triton":
        import fusedtrain.triton  # imports triton itself: only when asked for

        return getattr(fusedtrain.triton, name)
    if torch.compiler.is_compiling():
        # torch.compile traces the op itself (through its fake kernel); the optimizer ops in the
        # form that takes their float hyperparameters as a tensor.
        return _TRACED_OPTIMIZER_OPS.get(name) or getattr(torch.ops.fusedtrain, name)
    if device.type == "cpu" and name in DIRECT_CPU_BINDINGS:
        # The same CPU kernel that torch.ops.fusedtrain.<name> runs, bound without the
        # dispatcher, whose conversion of six Python lists of tensors costs as much as updating
        # 1e5 elements.
        return getattr(_extension._C, name.rstrip("_") + "_cpu")
    return getattr(torch.ops.fusedtrain, name)


def _hyper_tensor(*values: float | torch.Tensor) -> torch.Tensor:
    """The hyperparameters of a traced optimizer op in one float64 CPU tensor. Each is added to a
    zero tensor: dynamo then makes a float that changed between calls an input of the graph,
    where an op's float argument, or torch.tensor(values), would be specialized on its value and
    the step compiled again for each one."""
    zero = torch.zeros((), dtype=torch.float64)
    return torch.stack([zero + (v.reshape(()).cpu() if isinstance(v, torch.Tensor) else v)
                        for v in values])


def _traced_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                      beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None,
                      found_inf=None, lr_tensor=None):
    """adam_step_ under torch.compile: adam_step_hyper_tensor_, its floats in one tensor."""
    torch.ops.fusedtrain.adam_step_hyper_tensor_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        _hyper_tensor(lr, beta1, beta2, eps, weight_decay), decoupled, amsgrad, maximize,
        grad_scale, found_inf, lr_tensor)


def _traced_sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                     nesterov, maximize, first_step, grad_scale=None, found_inf=None,
                     lr_tensor=None):
    """sgd_step_ under torch.compile: sgd_step_hyper_tensor_, its floats in one tensor."""
    torch.ops.fusedtrain.sgd_step_hyper_tensor_(
        params, grads, momentum_buffers, _hyper_tensor(lr, momentum, dampening, weight_decay),
        nesterov, maximize, first_step, grad_scale, found_inf, lr_tensor)


_TRACED_OPTIMIZER_OPS = {"adam_step_": _traced_adam_step, "sgd_step_": _traced_sgd_step}
