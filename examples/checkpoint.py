"""Save a checkpoint mid-training (the model's and optimizer's state_dicts, the epoch, and the
state of the generator that shuffles the data), load it into a freshly built model and optimizer,
and resume: the resumed run ends with exactly the params of a run that was never interrupted.

    python examples/checkpoint.py [--epochs 6] [--checkpoint PATH]
"""

import argparse
import os
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# from torch.optim import Adam   <- stock
from fusedtrain.optim import Adam  # the one-line swap


def build(seed):
    """The model and its optimizer; the seed sets the model's initial weights."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    return model, Adam(model.parameters(), lr=1e-3)


def shuffled_loader(dataset, shuffle_state=None):
    """The DataLoader shuffles with its own generator, so the batch order is part of what a
    checkpoint must restore."""
    shuffle = torch.Generator().manual_seed(1)
    if shuffle_state is not None:
        shuffle.set_state(shuffle_state)
    return DataLoader(dataset, batch_size=32, shuffle=True, generator=shuffle), shuffle


def train(model, optimizer, loader, first_epoch, last_epoch, label):
    criterion = nn.MSELoss()
    for epoch in range(first_epoch, last_epoch + 1):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
        print(f"{label} epoch {epoch}: train loss {total / len(loader.dataset):.6f}")


def interrupted_run(dataset, epochs, path):
    """Trains half the epochs, saves a checkpoint to path, then resumes from it with new objects."""
    halfway = epochs // 2
    model, optimizer = build(seed=0)
    loader, shuffle = shuffled_loader(dataset)
    train(model, optimizer, loader, 1, halfway, "first half")
    torch.save({
        "epoch": halfway,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "shuffle_state": shuffle.get_state(),
    }, path)
    print(f"saved the checkpoint of epoch {halfway} to {path}")

    # What a new process would do: build everything afresh (other initial weights), then load.
    model, optimizer = build(seed=123)
    checkpoint = torch.load(path)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    loader, _ = shuffled_loader(dataset, checkpoint["shuffle_state"])
    print(f"loaded the checkpoint, resuming after epoch {checkpoint['epoch']}")
    train(model, optimizer, loader, checkpoint["epoch"] + 1, epochs, "resumed")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="total epochs; the checkpoint is taken halfway")
    parser.add_argument("--checkpoint", help="where to write the checkpoint (default: a temporary directory)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    dataset = TensorDataset(x, x[:, :1] * x[:, 1:2] + torch.sin(x[:, 2:3]))

    model, optimizer = build(seed=0)
    loader, _ = shuffled_loader(dataset)
    train(model, optimizer, loader, 1, args.epochs, "uninterrupted")

    with tempfile.TemporaryDirectory() as tmp:
        resumed = interrupted_run(dataset, args.epochs, args.checkpoint or os.path.join(tmp, "checkpoint.pt"))

    pairs = list(zip(model.parameters(), resumed.parameters()))
    identical = all(torch.equal(a, b) for a, b in pairs)
    gap = max((a - b).abs().max().item() for a, b in pairs)
    print(f"resumed params identical to the uninterrupted run's: {identical} (largest difference {gap})")


if __name__ == "__main__":
    main()
