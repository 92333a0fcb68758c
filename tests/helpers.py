"""Fresh random params and gradients, and a runner that trains a torch.optim optimizer and a
fusedtrain one side by side on identical data."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

# Shapes of one model's params: matrices, a vector, an odd size, a 0-dim and an empty tensor.
PARAM_SHAPES = [(17, 9), (33,), (5, 4, 3), (), (0, 3), (1031,)]


def make_params(dtype: torch.dtype, seed: int, shapes=PARAM_SHAPES) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.5 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype))
            for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_random_grads(param_sets, generator: torch.Generator) -> None:
    """The same fresh random gradient on the corresponding param of every set."""
    for group in zip(*param_sets):
        grad = torch.randn(group[0].shape, generator=generator, dtype=torch.float64)
        for p in group:
            p.grad = grad.to(p.dtype)


def train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_random_grads([torch_params, fused_params], g)
        torch_opt.step()
        fused_opt.step()


def run_triton_checks(script: str, *args: str, device: str = "cpu") -> None:
    """Runs `script` (a test file that is also a checker) with `args` in a fresh process:
    under TRITON_INTERPRET=1 on CPU tensors (it must be set before triton is imported), or
    compiled on CUDA; from outside the checkout, so the installed package is imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, os.path.abspath(script), device, *args],
                            cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"checks {args} failed:\n{result.stdout}\n{result.stderr}"


class SimpleModel(torch.nn.Module):
    """The tutorials' MLP, written with attributes and a forward (fusedtrain traces it with fx)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 64)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(64, 32)
        self.fc3 = torch.nn.Linear(32, 1)

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)
