"""Runs a piece of Python in a fresh interpreter: for checks that may crash the process (a kernel
indexing past 2^31 elements) or that need its memory to themselves (RSS over a long loop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import fusedtrain


def run_python(code: str, timeout: float) -> dict:
    """Runs `code` with the fusedtrain that this process imported (a checkout or the installed
    package) first on the path; returns the JSON object that it prints as its last line."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fusedtrain.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"child exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])
