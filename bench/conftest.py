"""Benchmark plumbing: the `slow` marker with its --run-slow switch, and the per-group table of
medians, GB/s and ratios (bench/summarize.py) printed at the end of a benchmark run."""

from __future__ import annotations

import os

import pytest

import summarize

RESULTS = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the benchmarks marked slow (or set FUSEDTRAIN_BENCH_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large workload, skipped unless --run-slow or FUSEDTRAIN_BENCH_SLOW=1")
    config.stash[RESULTS] = []


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("FUSEDTRAIN_BENCH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow or set FUSEDTRAIN_BENCH_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def record_result(request):
    """Called with a summarize.markdown row once a benchmark has its median."""
    return request.config.stash[RESULTS].append


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash[RESULTS]
    if rows:
        terminalreporter.write_sep("-", "optimizer step bandwidth per group")
        terminalreporter.write_line(summarize.markdown(rows))
