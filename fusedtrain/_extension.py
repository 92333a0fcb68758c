"""Loads the compiled extension, fusedtrain._C, which registers the torch.ops.fusedtrain ops.

Where it is looked for:
  1. beside this file: an installed package, an editable install, or an in-place build;
  2. from a source checkout without a build of its own (`python -m fusedtrain ...`, `python -m
     pytest` or an example run from the repository root, after `pip install --no-build-isolation
     .` put the build in site-packages): the installed package's _C, if it was built from this
     checkout's csrc/ (the digest compiled into it says so, see _sources.py). A build of other
     sources is not used: its ops would not match this checkout's Python.
Without one (a checkout that was never built, a build that failed) fusedtrain still works:
everything runs on the plain-PyTorch reference path, and a warning says once why and what to run.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads libtorch, which fusedtrain._C links against)

from fusedtrain._sources import source_digest

PACKAGE_DIR = Path(__file__).resolve().parent
# csrc/ beside the package: present in a source checkout, absent in an installed package.
CHECKOUT_SOURCES = PACKAGE_DIR.parent / "csrc"
BUILD_COMMAND = "pip install --no-build-isolation ."


def _installed_extension_paths() -> list[Path]:
    """fusedtrain/_C*.so in the other entries of sys.path (site-packages), in path order."""
    found = []
    for entry in sys.path:
        directory = Path(entry or os.getcwd()).resolve() / "fusedtrain"
        if directory == PACKAGE_DIR or not directory.is_dir():
            continue
        found += [directory / ("_C" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES
                  if (directory / ("_C" + suffix)).is_file()]
    return found


def _load_from_checkout():
    """The installed _C for this source checkout: (module, None), or (None, why not)."""
    paths = _installed_extension_paths()
    if not paths:
        return None, (f"this source checkout ({PACKAGE_DIR.parent}) has no build, and no installed "
                      f"fusedtrain has one: run `{BUILD_COMMAND}` there")
    spec = importlib.util.spec_from_file_location("fusedtrain._C", paths[0])
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        return None, f"the installed {paths[0]} does not load ({error}): run `{BUILD_COMMAND}` again"
    if module.source_digest() != source_digest(CHECKOUT_SOURCES):
        return None, (f"the installed {paths[0]} was built from other C++ sources than this "
                      f"checkout's ({CHECKOUT_SOURCES}): run `{BUILD_COMMAND}` (or "
                      "`python setup.py build_ext --inplace`) in the checkout to rebuild it")
    sys.modules["fusedtrain._C"] = module
    return module, None


try:
    from fusedtrain import _C
except ImportError as error:
    if CHECKOUT_SOURCES.is_dir():
        _C, LOAD_ERROR = _load_from_checkout()
    else:
        _C, LOAD_ERROR = None, f"{error}; reinstall with `{BUILD_COMMAND}`"
else:
    LOAD_ERROR = None

if _C is None:  # pragma: no cover - exercised only without a build
    warnings.warn(
        f"fusedtrain: the compiled extension is not available ({LOAD_ERROR}); using the slower "
        "plain-PyTorch reference path.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    from fusedtrain import _fake  # noqa: F401  (registers the fake kernels of the ops)


def native_available() -> bool:
    return _C is not None
