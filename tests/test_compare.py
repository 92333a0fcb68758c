"""`python -m fusedtrain compare`: the table, the JSON rows, the plot, the workload filter, the
bad-argument errors, and the interleaved timing with its params difference. Runs at --smoke
sizes; no timing is asserted."""

import json
import math
import sys

import pytest
import torch

from fusedtrain import _extension, compare
from fusedtrain.__main__ import main

needs_native = pytest.mark.skipif(not _extension.native_available(), reason="native extension not built")


def table_rows(out: str) -> list[list[str]]:
    """The cells of the Markdown table in `out`, the header first, without the rule."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not line.startswith("|-")]


@needs_native
def test_smoke_run_prints_the_table_and_writes_the_rows(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert main(["compare", "--smoke", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    expected_names = [w.name for w in compare.all_workloads("smoke")]
    rows = table_rows(out)
    assert rows[0] == ["workload", "stock", "fused", "speedup", "max abs diff"]
    assert [row[0] for row in rows[1:]] == expected_names
    assert f"[{len(expected_names)}/{len(expected_names)}]" in err  # progress goes to stderr

    written = json.loads(path.read_text())
    assert written["size"] == "smoke"
    assert written["machine"]["torch"] == torch.__version__ and written["machine"]["cores"] >= 1
    assert [r["workload"] for r in written["rows"]] == expected_names
    for r, cells in zip(written["rows"], rows[1:]):
        assert len(r["stock_times_s"]) == len(r["fused_times_s"]) == r["repeats"] >= 1
        assert r["stock_s"] > 0 and r["fused_s"] > 0
        assert r["speedup"] == pytest.approx(r["stock_s"] / r["fused_s"])
        assert cells[3] == f"{r['speedup']:.2f}x"
        # Stock and fused trained from the same params on the same data: fp32 rounding apart.
        assert math.isfinite(r["max_abs_diff"]) and r["max_abs_diff"] < 1e-4, r


@needs_native
def test_plot_is_a_png_bar_chart(tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "speedups.png"
    assert main(["compare", "--smoke", "--only", "line,sgd-fp32", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = image.imread(path).shape
    assert height > 100 and width > 100 and channels in (3, 4)
    assert len(table_rows(capsys.readouterr().out)) == 1 + 3  # line-sgd, sgd-fp32 x 2


def test_only_selects_workloads_by_parts_of_their_names():
    chosen = compare.select(compare.all_workloads("quick"), " thermometer, sgd-")
    assert [w.name for w in chosen] == ["thermometer-adam-5000", "line-sgd-1000", "sgd-fp32-1x1e6", "sgd-fp32-100x1e3"]
    assert len(compare.select(compare.all_workloads("quick"), None)) == len(compare.all_workloads("quick"))


@pytest.mark.parametrize("args, message", [
    (["--only", "no-such-workload"], "--only 'no-such-workload' matches no workload"),
    (["--json", "/no/such/directory/rows.json"], "--json /no/such/directory/rows.json: the directory"),
    (["--plot", "/no/such/directory/plot.png"], "--plot /no/such/directory/plot.png: the directory"),
])
def test_bad_arguments_are_named_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--smoke", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "[1/" not in err


def test_plot_without_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an import of an absent package sees
    with pytest.raises(SystemExit):
        main(["compare", "--smoke", "--plot", str(tmp_path / "plot.png")])
    assert "--plot needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "plot.png").exists()


def counting_workload(whole_training: bool, calls: list) -> compare.Workload:
    """stock adds 1 and fused adds 1.5 to a zero tensor per run, recording who ran."""
    def prepare():
        def start(variant):
            value = torch.zeros(3)

            def run():
                calls.append(variant)
                value.add_(1.0 if variant == compare.STOCK else 1.5)
            return compare.Trial(run, [value])
        return start
    return compare.Workload("counting", "", prepare, repeats=3, whole_training=whole_training)


@pytest.mark.parametrize("whole_training, diff", [(False, 4 * 1.5 - 4 * 1.0), (True, 1.5 - 1.0)])
def test_measure_interleaves_the_variants_and_compares_their_last_params(whole_training, diff):
    calls = []
    result = compare.measure(counting_workload(whole_training, calls))
    # The warm-up, then alternating who goes first.
    assert calls == ["stock", "fused", "stock", "fused", "fused", "stock", "stock", "fused"]
    assert len(result.stock_times_s) == len(result.fused_times_s) == 3
    # Stepping on: warm-up + 3 runs each; whole trainings: each timed run starts from zero.
    assert result.max_abs_diff == diff
