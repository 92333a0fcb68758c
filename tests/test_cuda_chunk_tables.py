"""The host side of the CUDA multi-tensor launcher (csrc/cuda/multi_tensor_apply.cuh), which is
plain C++: csrc/tests/test_chunk_tables.cpp checks, without a GPU, that the kernel-argument
tables of every launch cover each element of each tensor exactly once."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_chunk_tables_cover_every_element_once(tmp_path):
    binary = tmp_path / "test_chunk_tables"
    compile_result = subprocess.run(
        [COMPILER, "-std=c++20", "-O1", "-Wall", "-Wextra", f"-I{ROOT / 'csrc' / 'include'}",
         str(ROOT / "csrc" / "tests" / "test_chunk_tables.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=300)
    assert compile_result.returncode == 0, compile_result.stderr[-5000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
