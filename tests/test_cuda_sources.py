"""Every CUDA source compiles, with nvcc, against the installed torch's headers for sm_80 and
sm_90a: machines without a GPU (CI) catch a broken CUDA build here. Running the kernels is
tests/test_cuda.py's job, on a GPU."""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    # The flags of setup.py's CUDA build (NVCC_FLAGS), plus the includes it gets from torch.
    # --threads 0: the two architectures compile side by side, on as many cores as there are.
    command = ["nvcc", "-std=c++20", "-O3", "--fmad=false", "--expt-relaxed-constexpr", "--threads", "0", *ARCHS,
               "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
               f"-I{ROOT / 'csrc' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
               "-DFUSEDTRAIN_WITH_CUDA=1", *(f"-I{p}" for p in include_paths())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "CUDAFLAGS": ""})
    assert result.returncode == 0, result.stderr[-5000:]
