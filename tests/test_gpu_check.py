"""bench/gpu_check.py without a GPU: its dry run shows the plan within the budget, a run on a
machine without a GPU stops with status 2 after the summary's header, and its test stage cannot
report green without testing: a skip (other than the two-GPU tests) or no test at all fails, and
a hung test run is killed at its limit, keeping the outcomes it printed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_shows_the_plan_within_its_budget():
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for stage in ("build", "verify", "tests", "benchmarks"):
        assert f"  {stage} " in result.stdout
    total, budget = result.stdout.split("total")[1].split("s of")
    assert int(total.strip(" ~")) <= int(budget.split()[0]) <= 420


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_check_stops_after_the_header(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check") and "- command: `python bench/gpu_check.py --out" in summary
    assert "no CUDA device" in summary


@pytest.mark.parametrize("body,verdict", [
    ("def test_ok():\n    pass\n", None),
    ("import pytest\n@pytest.mark.skip(reason='no CUDA device')\ndef test_skipped():\n    pass\n",
     "GPU tests failed or skipped"),
    ("import pytest\n@pytest.mark.skip(reason='needs two GPUs')\ndef test_two():\n    pass\n"
     "def test_ok():\n    pass\n", None),
    ("def test_broken():\n    assert False\n", "GPU tests failed or skipped"),
    ("", "no GPU test ran"),
], ids=["passed", "skipped", "two-GPU skip allowed", "failed", "no test"])
def test_test_stage_fails_on_a_skip_a_failure_or_no_test(tmp_path, monkeypatch, body, verdict):
    gpu_check = load_gpu_check()
    (tmp_path / "test_gpu_stage.py").write_text(body)
    monkeypatch.setattr(gpu_check, "TEST_COMMAND", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                    str(tmp_path / "test_gpu_stage.py")])
    monkeypatch.setattr(gpu_check, "TEST_RUNS", [("not nothing", "tests.xml", None)])
    report = gpu_check.Report(tmp_path / "out")
    gpu_check.run_tests(report, tmp_path / "out", gpu_check.Budget(200))
    assert (verdict in report.failures) if verdict is not None else report.failures == []
    assert "## GPU tests" in (tmp_path / "out" / "summary.md").read_text()


def test_runs_killed_at_their_limits_keep_what_they_printed_and_lose_only_their_own_tests(tmp_path, monkeypatch):
    # Two runs, each hanging (as two cooperative grids waiting on each other would) and so killed
    # at its share of the stage's 30 s, leaving no JUnit report: both are reported as not finished,
    # and the tests the first ended before its hang are read from its log.
    gpu_check = load_gpu_check()
    (tmp_path / "test_gpu_stage.py").write_text(
        "import time, pytest\n"
        "def test_a_ok():\n    pass\n"
        "def test_b_broken():\n    assert False\n"
        "def test_c_hangs():\n    time.sleep(600)\n"
        "@pytest.mark.last\ndef test_d_hangs():\n    time.sleep(600)\n")
    monkeypatch.setattr(gpu_check, "TEST_COMMAND", gpu_check.TEST_COMMAND[:-1] + [
        "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path / "test_gpu_stage.py")])
    monkeypatch.setattr(gpu_check, "TEST_RUNS", [("not last", "tests.xml", None), ("last", "tests-last.xml", 15)])
    report = gpu_check.Report(tmp_path / "out")
    gpu_check.run_tests(report, tmp_path / "out", gpu_check.Budget(gpu_check.BENCHMARK_RESERVE_S + 30))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| passed | 1 |" in summary and "| failed | 1 | test_gpu_stage::test_b_broken |" in summary
    assert "-m 'not last': killed after" in summary and "-m 'last': killed after" in summary
    assert report.failures == ["GPU tests did not finish", "GPU tests failed or skipped"]
