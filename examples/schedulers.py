"""Learning-rate schedulers drive fusedtrain's optimizers exactly as they drive torch.optim's:
StepLR halving the learning rate of SGD every few epochs, and ReduceLROnPlateau cutting Adam's
when the validation loss stops improving, then StepLR around fusedtrain.fit, one epoch per call.
The model is a linear regression on 8 features, trained on mini-batches.

    python examples/schedulers.py [--epochs 15]
"""

import argparse

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader, TensorDataset

import fusedtrain
# from torch.optim import SGD, Adam   <- stock
from fusedtrain.optim import SGD, Adam  # the one-line swap
from fusedtrain.workloads import regression


def train_one_epoch(model, optimizer, loader, criterion):
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()


def validate(model, x, y, criterion):
    with torch.no_grad():
        return criterion(model(x), y).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = regression(640, 8, 1)  # y = x @ w + 0.1 * noise
    x_train, y_train, x_val, y_val = x[:512], y[:512], x[512:], y[512:]
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    criterion = nn.MSELoss()

    print("SGD + StepLR(step_size=5, gamma=0.5)")
    model = nn.Linear(8, 1)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = StepLR(optimizer, step_size=5, gamma=0.5)
    for epoch in range(1, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_one_epoch(model, optimizer, loader, criterion)
        scheduler.step()
        print(f"StepLR epoch {epoch}: lr {lr:.6g}, val loss {validate(model, x_val, y_val, criterion):.6g}")

    print("Adam + ReduceLROnPlateau(factor=0.5, patience=2) on the validation loss")
    model = nn.Linear(8, 1)
    optimizer = Adam(model.parameters(), lr=0.1)
    scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    for epoch in range(1, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_one_epoch(model, optimizer, loader, criterion)
        val_loss = validate(model, x_val, y_val, criterion)
        scheduler.step(val_loss)
        print(f"Plateau epoch {epoch}: lr {lr:.6g}, val loss {val_loss:.6g}")

    # fit runs each epoch natively and reads the optimizer's lr afresh on every call.
    print("fusedtrain.fit, one epoch per call, SGD + StepLR(step_size=5, gamma=0.5)")
    model = nn.Linear(8, 1)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = StepLR(optimizer, step_size=5, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        history = fusedtrain.fit(model, optimizer, x_train, y_train, epochs=1, batch_size=32, shuffle=True,
                                 generator=g, val=(x_val, y_val))
        scheduler.step()
        print(f"fit+StepLR epoch {epoch}: lr {lr:.6g}, val loss {history.val_loss[-1].item():.6g}")


if __name__ == "__main__":
    main()
