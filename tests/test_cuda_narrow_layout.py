"""The host side of the one-launch narrow-stack CUDA kernel (csrc/cuda/stack_narrow_layout.h),
which is plain C++: csrc/tests/test_narrow_layout.cpp checks, without a GPU, that every
shared-memory layout gives each buffer its own range of the size the kernel addresses, and that
the grid stays within its tiles, the co-resident blocks and the bound on partial gradients."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_narrow_layouts_and_grids(tmp_path):
    binary = tmp_path / "test_narrow_layout"
    compile_result = subprocess.run(
        [COMPILER, "-std=c++20", "-O1", "-Wall", "-Wextra", f"-I{ROOT / 'csrc' / 'include'}",
         str(ROOT / "csrc" / "tests" / "test_narrow_layout.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=300)
    assert compile_result.returncode == 0, compile_result.stderr[-5000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
