"""Fixtures for every test."""

import pytest

import fusedtrain


@pytest.fixture(autouse=True)
def _restore_cpu_isa():
    """Tests may switch the CPU kernels' instruction set; put the default back afterwards."""
    c = fusedtrain._extension._C
    before = c.cpu_isa() if c is not None else None
    yield
    if c is not None:
        c.set_cpu_isa(before)
