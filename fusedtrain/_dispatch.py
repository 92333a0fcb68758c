"""Picks the implementation of each op: one table, one place.

Backends: "native" (the compiled kernels: torch.ops.fusedtrain, or for eager CPU calls the same
kernel functions bound directly) and "reference" (plain PyTorch, fusedtrain.reference). "auto" takes the native kernel where one is built for the tensors' device
and the reference otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch

from fusedtrain import _extension, reference

BACKENDS = ("auto", "native", "reference")


def _native_devices() -> tuple[str, ...]:
    if not _extension.native_available():
        return ()
    return ("cpu", "cuda") if _extension._C.has_cuda_kernels() else ("cpu",)


# Device types that have native kernels in this build. Fixed at import, which also keeps the
# extension call out of what torch.compile traces.
NATIVE_DEVICES = _native_devices()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend ("native" or "reference") that runs ops on `device`."""
    check_backend(backend)
    native = device.type in NATIVE_DEVICES
    if backend == "auto":
        return "native" if native else "reference"
    if backend == "native" and not native:
        why = "the extension is not built" if not _extension.native_available() else (
            f"this build has no {device.type} kernels")
        raise RuntimeError(f"backend='native' cannot run on {device}: {why}")
    return backend


def op(name: str, backend: str, device: torch.device) -> Callable[..., None]:
    """The callable implementing op `name` for `backend` on `device`."""
    if resolve(backend, device) == "reference":
        return getattr(reference, name)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        # The same CPU kernel that torch.ops.fusedtrain.<name> runs, bound without the
        # dispatcher, whose conversion of six Python lists of tensors costs as much as updating
        # 1e5 elements. torch.compile traces the op itself.
        return getattr(_extension._C, name.rstrip("_") + "_cpu")
    return getattr(torch.ops.fusedtrain, name)
