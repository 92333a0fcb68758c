"""The training workloads that benchmarks (bench/) and comparisons time: the tutorials' small
fits and two wide regressions, each as data plus the stock PyTorch loop to compare against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The thermometer of "Deep Learning with PyTorch": Celsius readings and an unknown unit.
THERMOMETER_T_C = [0.5, 14.0, 15.0, 28.0, 11.0, 8.0, 3.0, -4.0, 6.0, 13.0, 21.0]
THERMOMETER_T_U = [35.7, 55.9, 58.2, 81.9, 56.3, 48.9, 33.9, 21.8, 48.4, 60.4, 68.4]


def thermometer(scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(t_u * scale, t_c) as (11, 1) columns: the model is t_c = w * t_u + b."""
    return (scale * torch.tensor(THERMOMETER_T_U).unsqueeze(1), torch.tensor(THERMOMETER_T_C).unsqueeze(1))


def thermometer_model() -> nn.Linear:
    """nn.Linear(1, 1) starting where the tutorial starts: w = 1, b = 0."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    return model


def noisy_line(n: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x = linspace(0, 10, n), y = 2x + 1 + noise, as (n, 1) columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 10, n).unsqueeze(1)
    return x, 2 * x + 1 + 0.5 * torch.randn(n, 1, generator=g)


def regression(n: int, inp: int, out: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random x (n, inp) and a noisy linear target (n, out)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g)
    w = torch.randn(out, inp, generator=g) / inp**0.5
    return x, x @ w.T + 0.1 * torch.randn(n, out, generator=g)


def stock_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """The loop every tutorial teaches, one step."""
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def stock_fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, epochs: int) -> Tensor:
    """Full-batch stock training; returns the last loss."""
    loss = None
    for _ in range(epochs):
        loss = stock_step(model, optimizer, x, y)
    return loss
