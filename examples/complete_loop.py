"""The tutorials' complete training loop — the model as a class, mini-batches from a shuffled
DataLoader, Adam, a per-epoch StepLR, validation under torch.no_grad(), early stopping and a
best-model checkpoint — written twice: the stock loop, and the same loop with each epoch's
batches (forward, loss, backward, Adam step) run natively by fusedtrain.fit(..., epochs=1).
Both print their epochs and must end on the same params.

    python examples/complete_loop.py [--epochs 30] [--patience 5]
"""

import argparse
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fusedtrain


class SimpleModel(nn.Module):
    """The tutorial's model: fusedtrain traces its forward into a stack of layers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 1)

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def make_data(n, generator):
    x = torch.randn(n, 10, generator=generator)
    y = torch.sin(x[:, :3].sum(1, keepdim=True)) + 0.5 * x[:, 3:4] * x[:, 4:5]
    return x, y + 0.05 * torch.randn(n, 1, generator=generator)


def validate(model, x, y, criterion):
    with torch.no_grad():
        return criterion(model(x), y).item()


def train(fused: bool, epochs: int, patience: int):
    """Returns the best model's params and the epoch they came from."""
    g = torch.Generator().manual_seed(0)
    train_x, train_y = make_data(1000, g)
    val_x, val_y = make_data(300, g)
    torch.manual_seed(0)
    model = SimpleModel()
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=32, shuffle=True)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    best_loss, best_epoch, best_state, waited = float("inf"), 0, None, 0
    for epoch in range(1, epochs + 1):
        if fused:  # every batch of the epoch in one native call
            train_loss = fusedtrain.fit(model, optimizer, loader, epochs=1, criterion=criterion).train_loss.item()
        else:
            model.train()
            losses = []
            for x, y in loader:
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            train_loss = sum(losses) / len(losses)
        scheduler.step()
        model.eval()
        val_loss = validate(model, val_x, val_y, criterion)
        print(f"{'fused' if fused else 'stock'} epoch {epoch:3d}: train {train_loss:.5f}, val {val_loss:.5f}, "
              f"lr {scheduler.get_last_lr()[0]:.2e}")
        if val_loss < best_loss:
            best_loss, best_epoch, best_state, waited = val_loss, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                print(f"{'fused' if fused else 'stock'}: early stop at epoch {epoch}")
                break
    model.load_state_dict(best_state)  # the best-model checkpoint
    return model, best_epoch, best_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    args = parser.parse_args()
    stock, stock_epoch, stock_loss = train(False, args.epochs, args.patience)
    fused, fused_epoch, fused_loss = train(True, args.epochs, args.patience)
    difference = max((a - b).abs().max().item() for a, b in zip(stock.parameters(), fused.parameters()))
    print(f"stock best: epoch {stock_epoch}, val loss {stock_loss:.6f}")
    print(f"fused best: epoch {fused_epoch}, val loss {fused_loss:.6f}")
    print(f"largest difference between the two best models' params: {difference:.2e}")


if __name__ == "__main__":
    main()
