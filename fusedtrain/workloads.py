"""The training workloads that benchmarks (bench/) and `python -m fusedtrain compare` time: the
tutorials' small fits, two wide regressions, a small MLP trained from a DataLoader, and the params
of optimizer steps, each as data plus the stock PyTorch loop to compare against."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

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


def stock_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               criterion: nn.Module | None = None) -> Tensor:
    """The loop every tutorial teaches, one step (criterion None: MSE)."""
    optimizer.zero_grad()
    loss = (criterion or nn.functional.mse_loss)(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def stock_fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, epochs: int,
              criterion: nn.Module | None = None) -> Tensor:
    """Full-batch stock training; returns the last loss."""
    loss = None
    for _ in range(epochs):
        loss = stock_step(model, optimizer, x, y, criterion)
    return loss


def linear(inp: int, out: int, seed: int = 0) -> nn.Linear:
    """nn.Linear(inp, out) with torch's default init from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(inp, out)


def regression_mlp(seed: int = 0) -> nn.Sequential:
    """The tutorials' small MLP, 10-64-32-1 with ReLU, default init from `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))


def two_layer_line(seed: int = 0) -> nn.Sequential:
    """A tutorial's Linear(1, 2) -> Linear(2, 1), default init from `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1))


def wide_mlp(seed: int = 0) -> nn.Sequential:
    """MLP 1024-4096-4096-1024 with ReLU, default init from `seed`: GEMM-bound."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                             nn.Linear(4096, 1024))


def nonlinear_data(n: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x (n, 10) and a smooth nonlinear target (n, 1) with a little noise: the MLP's data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = torch.sin(x[:, :3].sum(1, keepdim=True)) + 0.5 * x[:, 3:4] * x[:, 4:5]
    return x, y + 0.05 * torch.randn(n, 1, generator=g)


def shuffled_loader(x: Tensor, y: Tensor, batch_size: int = 32, seed: int = 0) -> DataLoader:
    """DataLoader(TensorDataset(x, y), batch_size, shuffle=True), the order drawn from `seed` so
    that two trainings see the same batches."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def stock_loader_fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int) -> Tensor:
    """The mini-batch loop as the tutorials write it; returns the last batch's loss."""
    criterion = nn.MSELoss()
    loss = None
    for _ in range(epochs):
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
    return loss


def optimizer_tensors(workload: str, dtype: torch.dtype = torch.float32) -> tuple[list[Tensor], list[Tensor]]:
    """(params, grads) for timing an optimizer step, values in [-1, 1]. `workload` is "COUNTxSIZE"
    (e.g. "100x1e3": 100 tensors of 1000 elements) or "mlp" (the weights and biases of Linear
    1024-4096-4096-1024, 25.2M elements)."""
    gen = torch.Generator().manual_seed(0)
    if workload == "mlp":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            mlp = nn.Sequential(*(nn.Linear(i, o, dtype=dtype) for i, o in [(1024, 4096), (4096, 4096), (4096, 1024)]))
        params = [p.detach() for p in mlp.parameters()]
    else:
        count, size = workload.split("x")
        # uniform_ rather than randn: much faster for 5e7 elements, and values do not change the timing.
        params = [torch.empty(int(float(size)), dtype=dtype).uniform_(-1, 1, generator=gen) for _ in range(int(count))]
    grads = [torch.empty_like(p).uniform_(-1, 1, generator=gen) for p in params]
    return params, grads
