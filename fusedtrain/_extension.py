"""Loads the compiled extension, fusedtrain._C, which registers the torch.ops.fusedtrain ops.

Without it (a source checkout that was never built, a build that failed) fusedtrain still works:
everything runs on the plain-PyTorch reference path, and a warning says so once.
"""

import warnings

import torch  # noqa: F401  (loads libtorch, which fusedtrain._C links against)

try:
    from fusedtrain import _C
except ImportError as error:  # pragma: no cover - exercised only without a build
    _C = None
    LOAD_ERROR = error
    warnings.warn(
        f"fusedtrain: the compiled extension is not available ({error}); using the slower "
        "plain-PyTorch reference path. Install with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOAD_ERROR = None
    from fusedtrain import _fake  # noqa: F401  (registers the fake kernels of the ops)


def native_available() -> bool:
    return _C is not None
