"""Builds fusedtrain._C against the installed torch.

    pip install --no-build-isolation .      # or -e . for development

A plain `pip install .` (build isolation) works too: the build then imports the torch of the
environment it installs into, never a second one (see import_target_torch).

CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when the installed torch
has CUDA and nvcc is found; FUSEDTRAIN_CUDA=1 forces them, FUSEDTRAIN_CUDA=0 skips them. They
are compiled for TORCH_CUDA_ARCH_LIST, by default sm_80 and sm_90.
"""

import os
import runpy
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

# -ffp-contract=off: no fused multiply-adds behind our back, so the AVX-512, AVX2 and baseline
# loops round identically. -fno-math-errno lets sqrt vectorize. -fopenmp makes at::parallel_for
# use torch's OpenMP thread pool (without it the header falls back to one thread).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# --fmad=false: the CUDA kernels round like the CPU ones (no contracted multiply-adds).
NVCC_FLAGS = ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]
# Architectures when TORCH_CUDA_ARCH_LIST is not set: A100 and H100/H200.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def import_target_torch():
    """The torch that the extension will run with. Under pip's build isolation the environment's
    site-packages are hidden, and a torch in the build requirements would be a second, possibly
    different one (gigabytes of CUDA wheels), so the environment's own directories, which are
    the interpreter's, are searched instead."""
    try:
        import torch
    except ModuleNotFoundError:
        paths = sysconfig.get_paths()
        sys.path.extend(p for p in (paths["platlib"], paths["purelib"]) if p not in sys.path)
        try:
            import torch
        except ModuleNotFoundError:
            sys.exit("fusedtrain builds its extension against the installed torch, and this Python "
                     f"({sys.executable}) has none: install torch first (pip install torch), then "
                     "pip install --no-build-isolation .")
    return torch


def cpp_sources():
    lines = (CSRC / "sources.txt").read_text().splitlines()
    return [f"csrc/{line.strip()}" for line in lines if line.strip() and not line.startswith("#")]


def digest_source():
    """The generated source that defines _C.source_digest()'s value, the digest of csrc/ (see
    fusedtrain/_sources.py). A file of its own rather than a -D flag: a new digest then recompiles
    one file, not every source."""
    path = "build/generated/source_digest.cpp"
    runpy.run_path(str(ROOT / "fusedtrain" / "_sources.py"))["write_digest_source"](CSRC, ROOT / path)
    return [path]


def cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))


def build_cuda():
    setting = os.environ.get("FUSEDTRAIN_CUDA", "")
    if setting in ("0", "1"):
        return setting == "1"
    torch = import_target_torch()
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def extension():
    import_target_torch()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include_dirs = [str(CSRC / "include")]
    if build_cuda() and cuda_sources():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        return CUDAExtension(
            "fusedtrain._C",
            cpp_sources() + digest_source() + cuda_sources(),
            include_dirs=include_dirs,
            define_macros=[("FUSEDTRAIN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "fusedtrain._C",
        cpp_sources() + digest_source(),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_class()})
