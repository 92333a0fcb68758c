"""Building and driving the harnesses that run narrow CUDA kernel bodies on CPU threads
(csrc/tests/test_narrow_kernel.cpp and test_fit_kernel.cpp, with the stand-in CUDA headers of
csrc/tests/emulation): the compile, the parts of a problem both read (csrc/tests/narrow_harness.h)
and the values both write back."""

import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def build_harness(directory, name):
    """csrc/tests/<name>.cpp compiled into `directory`; the binary's path."""
    binary = directory / name
    # -O0: the emulated runs wait on barriers, not on arithmetic; the build is what costs.
    result = subprocess.run(
        [COMPILER, "-std=c++20", "-O0", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-pthread",
         f"-I{ROOT / 'csrc' / 'tests' / 'emulation'}", f"-I{ROOT / 'csrc' / 'include'}",
         str(ROOT / "csrc" / "tests" / f"{name}.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return binary


def numbers(values):
    return " ".join(repr(float(v)) for v in torch.as_tensor(values).flatten().tolist())


def stack_lines(run, x, target):
    """The problem's stack, params and rows, for `run` (a Run) on x and target."""
    spec, params = run.spec, run.params
    widths = [x.shape[1]] + [params[i].shape[0] for i in spec.layer_params]
    lines = [f"{x.shape[0]} {len(widths) - 1} {' '.join(map(str, widths))}"]
    for bias, index, code, param in zip(spec.has_bias, spec.layer_params, spec.activations, spec.activation_params):
        lines.append(f"{int(bias)} {index} {int(code)} {param!r}")
    lines.append(f"{int(spec.loss)} {spec.reduction} {spec.loss_param!r} {spec.ignore_index} {spec.label_smoothing!r}")
    lines.append(str(len(params)))
    lines += [f"{p.numel()} {numbers(p)}" for p in params]
    return lines + [numbers(x), numbers(target)]


def update_lines(run, first_step):
    """The problem's optimizer: run's hyperparameters and state (SGD's first step as given)."""
    h = run.hyper
    if run.kind == "adam":
        lines = [" ".join(repr(float(h[k])) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
                 + f" {int(h['decoupled'])} {int(h['amsgrad'])} {int(h['maximize'])}"]
        exp_avgs, exp_avg_sqs, max_sqs, steps = run.state
        for i in range(len(run.params)):
            lines += [numbers(exp_avgs[i]), numbers(exp_avg_sqs[i])]
            if h["amsgrad"]:
                lines.append(numbers(max_sqs[i]))
            lines.append(numbers(steps[i]))
        return lines
    return ([" ".join(repr(float(h[k])) for k in ("lr", "momentum", "dampening", "weight_decay"))
             + f" {int(h['nesterov'])} {int(h['maximize'])} {int(first_step)}"]
            + [numbers(b) for b in run.state[0]])


def run_harness(binary, lines):
    """What the harness writes for the problem `lines`, as one fp64 tensor."""
    result = subprocess.run([str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return torch.tensor([float(v) for v in result.stdout.split()], dtype=torch.float64)


def params_and_state(values, run):
    """The rest of a harness's output (params, then state list by list), shaped like run's."""
    shaped = []
    for t in run.params + [t for group in run.state for t in group]:
        shaped.append(values[:t.numel()].reshape(t.shape))
        values = values[t.numel():]
    assert values.numel() == 0
    return shaped
