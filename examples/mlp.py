"""A small MLP (10-64-32-1, ReLU) trained with Adam on mini-batches from a DataLoader, with a
validation pass under torch.no_grad() after every epoch: the loop of the PyTorch tutorials, with
fusedtrain's Adam swapped in.

    python examples/mlp.py [--epochs 15]
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# from torch.optim import Adam   <- stock
from fusedtrain.optim import Adam  # the one-line swap


def make_data(n, generator):
    """10 features and a smooth nonlinear target with a little noise."""
    x = torch.randn(n, 10, generator=generator)
    y = torch.sin(x[:, :3].sum(1, keepdim=True)) + 0.5 * x[:, 3:4] * x[:, 4:5]
    return x, y + 0.05 * torch.randn(n, 1, generator=generator)


def evaluate(model, loader, criterion):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in loader:
            total += criterion(model(x), y).item() * len(x)
    return total / len(loader.dataset)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train_loader = DataLoader(TensorDataset(*make_data(1000, g)), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(*make_data(500, g)), batch_size=256)

    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    criterion = nn.MSELoss()
    optimizer = Adam(model.parameters(), lr=1e-3)

    first_val = evaluate(model, val_loader, criterion)
    print(f"before training: val loss {first_val:.4f}")
    for epoch in range(1, args.epochs + 1):
        model.train()
        running = 0.0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(x)
        val = evaluate(model, val_loader, criterion)
        print(f"epoch {epoch:3d}: train loss {running / len(train_loader.dataset):.4f}, val loss {val:.4f}")
    print(f"val loss {first_val:.4f} -> {val:.4f}")


if __name__ == "__main__":
    main()
