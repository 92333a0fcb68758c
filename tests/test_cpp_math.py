"""The C++ test of the shared math headers (csrc/tests/test_math.cpp), built by CMakeLists.txt
without torch and run by ctest, so one pytest command checks the headers that the CPU kernels
and the CUDA kernels both compile."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_math_headers_with_ctest(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DFUSEDTRAIN_BUILD_EXTENSION=OFF"],
        ["cmake", "--build", str(build), "--target", "test_math"],
        ["ctest", "--test-dir", str(build), "--output-on-failure", "-R", "test_math"],
    ]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert "100% tests passed" in result.stdout
