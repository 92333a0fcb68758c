"""Runs every examples/*.py as a script and checks what it prints against an independent
reference: least squares for the linear fits, torch's own schedulers' rules, the early-stopping
and checkpoint bookkeeping. A new example is run automatically and must get a check here."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

import fusedtrain
from fusedtrain.workloads import noisy_line, thermometer

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
CHECKS = {}


def check(name):
    def register(function):
        CHECKS[name] = function
        return function
    return register


def run_example(path: Path, cwd: Path) -> str:
    # One thread per process: the examples' tensors are tiny, and OpenMP threads spinning on a
    # busy 2-core machine make them tens of times slower without changing a result.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(w, b, mean squared error) of the exact best line through (x, y)."""
    a = torch.cat([x, torch.ones_like(x)], 1).double()
    solution = torch.linalg.lstsq(a, y.double()).solution
    return solution[0].item(), solution[1].item(), ((a @ solution - y.double()) ** 2).mean().item()


def test_every_example_has_a_check():
    assert EXAMPLES, "no examples/*.py found"
    assert sorted(CHECKS) == [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_gets_its_result(path, tmp_path):
    output = run_example(path, tmp_path)
    assert path.name in CHECKS, f"{path.name} ran; add a check of its output to this file"
    CHECKS[path.name](output)


@check("thermometer.py")
def check_thermometer(output):
    w_best, b_best, loss_best = least_squares(*thermometer())
    rows = re.findall(r"^(.+): loss (\S+) -> (\S+); t_c = w \* t_u \+ b with w = (\S+), b = (\S+)$", output, re.M)
    assert [r[0] for r in rows] == ["SGD", "Adam", "fusedtrain.fit (Adam)"], output
    for name, first, last, w, b in rows:
        assert float(last) < float(first) / 10, name
        assert float(last) <= loss_best * 1.001, name
    for name, first, last, w, b in rows[1:]:  # Adam reaches the optimum itself
        assert float(w) == pytest.approx(w_best, abs=1e-3), name
        assert float(b) == pytest.approx(b_best, abs=1e-2), name


@check("linear_regression.py")
def check_linear_regression(output):
    w_best, b_best, loss_best = least_squares(*noisy_line(100))
    rows = re.findall(r"^(.+): loss (\S+), w = (\S+), b = (\S+)$", output, re.M)
    assert [r[0] for r in rows] == ["training loop", "FusedTrainStep", "fusedtrain.fit"], output
    for name, loss, w, b in rows:
        assert float(w) == pytest.approx(2, abs=0.05) and float(b) == pytest.approx(1, abs=0.1), name
        assert float(w) == pytest.approx(w_best, abs=0.01) and float(b) == pytest.approx(b_best, abs=0.05), name
        assert float(loss) == pytest.approx(loss_best, rel=1e-2), name
    assert rows[0][1:] == rows[1][1:] == rows[2][1:], "the three ways of training printed different results"


@check("mlp.py")
def check_mlp(output):
    epochs = re.findall(r"^epoch +\d+: train loss (\S+), val loss (\S+)$", output, re.M)
    assert len(epochs) == 15, output
    first, last = map(float, re.search(r"^val loss (\S+) -> (\S+)$", output, re.M).groups())
    assert last < first / 4
    assert float(epochs[-1][1]) == last


@check("schedulers.py")
def check_schedulers(output):
    rows = {}
    for label, epoch, lr, val in re.findall(r"^(\S+) epoch (\d+): lr (\S+), val loss (\S+)$", output, re.M):
        rows.setdefault(label, []).append((int(epoch), float(lr), float(val)))
    assert sorted(rows) == ["Plateau", "StepLR", "fit+StepLR"], output
    for label in ("StepLR", "fit+StepLR"):
        assert [lr for _, lr, _ in rows[label]] == pytest.approx(
            [0.1 * 0.5 ** ((epoch - 1) // 5) for epoch, _, _ in rows[label]]), label
    # Replays the printed validation losses through torch's scheduler on a torch optimizer.
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = ReduceLROnPlateau(reference, mode="min", factor=0.5, patience=2)
    for epoch, lr, val in rows["Plateau"]:
        assert lr == pytest.approx(reference.param_groups[0]["lr"]), f"Plateau epoch {epoch}"
        scheduler.step(val)
    assert rows["Plateau"][-1][1] < 0.1, "the plateau scheduler never lowered the learning rate"
    for label, epochs in rows.items():
        assert len(epochs) == 15 and epochs[-1][2] < 0.02, label  # the noise alone gives 0.01


@check("early_stopping.py")
def check_early_stopping(output):
    stop = re.search(r"^early stop at epoch (\d+): no improvement for (\d+) epochs; "
                     r"best val loss (\S+) at epoch (\d+)$", output, re.M)
    assert stop, output
    stopped, patience, best_loss, best_epoch = stop.groups()
    assert int(stopped) == int(best_epoch) + int(patience)
    assert int(stopped) < 1000
    restored = re.search(r"^restored the weights of epoch (\d+): val loss (\S+)$", output, re.M)
    assert restored and restored.groups() == (best_epoch, best_loss), output
    printed = [float(v) for v in re.findall(r"^epoch \d+: train loss \S+, val loss (\S+)$", output, re.M)]
    assert printed and float(best_loss) <= min(printed)
    assert float(best_loss) < printed[-1], "the validation loss never turned up"


@check("checkpoint.py")
def check_checkpoint(output):
    losses = {}
    for label, epoch, loss in re.findall(r"^(.+) epoch (\d+): train loss (\S+)$", output, re.M):
        losses.setdefault(label, {})[int(epoch)] = loss
    assert sorted(losses["uninterrupted"]) == list(range(1, 7))
    assert sorted(losses["first half"]) == [1, 2, 3] and sorted(losses["resumed"]) == [4, 5, 6]
    assert {**losses["first half"], **losses["resumed"]} == losses["uninterrupted"]
    assert "resumed params identical to the uninterrupted run's: True (largest difference 0.0)" in output


@check("complete_loop.py")
def check_complete_loop(output):
    """The loop with each epoch's batches run by fusedtrain.fit picks the same best epoch as the
    stock loop, with the same validation loss and params up to fp32 rounding over ~1000 Adam steps."""
    stock = re.search(r"stock best: epoch (\d+), val loss ([\d.]+)", output)
    fused = re.search(r"fused best: epoch (\d+), val loss ([\d.]+)", output)
    assert stock and fused, output
    assert stock.group(1) == fused.group(1)
    assert abs(float(stock.group(2)) - float(fused.group(2))) <= 1e-4 * float(stock.group(2)) + 1e-6
    difference = float(re.search(r"best models' params: ([\d.e+-]+)", output).group(1))
    assert difference < 2e-3
    assert output.count("stock epoch") == output.count("fused epoch") >= 10
