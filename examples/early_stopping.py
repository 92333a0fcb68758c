"""Early stopping: train an MLP on 30 noisy points of a sine until the validation loss has not
improved for --patience epochs, keeping the best weights and restoring them at the end. With so
few points the network starts fitting the noise, and the validation loss turns up.

    python examples/early_stopping.py [--patience 50] [--max-epochs 1000]
"""

import argparse
import copy

import torch
from torch import nn

# from torch.optim import Adam   <- stock
from fusedtrain.optim import Adam  # the one-line swap


def noisy_sine(n, generator):
    x = 6 * torch.rand(n, 1, generator=generator) - 3
    return x, torch.sin(x) + 0.3 * torch.randn(n, 1, generator=generator)


def validate(model, x, y, criterion):
    model.eval()
    with torch.no_grad():
        return criterion(model(x), y).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--max-epochs", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = noisy_sine(30, g)
    x_val, y_val = noisy_sine(200, g)

    model = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    criterion = nn.MSELoss()
    optimizer = Adam(model.parameters(), lr=1e-2)

    best_loss, best_epoch, best_state = float("inf"), 0, None
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(x_train), y_train)
        loss.backward()
        optimizer.step()

        val_loss = validate(model, x_val, y_val, criterion)
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        if epoch % 25 == 0:
            print(f"epoch {epoch}: train loss {loss.item():.6f}, val loss {val_loss:.6f}")
        if epoch - best_epoch >= args.patience:
            print(f"early stop at epoch {epoch}: no improvement for {args.patience} epochs; "
                  f"best val loss {best_loss:.6f} at epoch {best_epoch}")
            break
    else:
        print(f"ran all {args.max_epochs} epochs; best val loss {best_loss:.6f} at epoch {best_epoch}")

    model.load_state_dict(best_state)
    print(f"restored the weights of epoch {best_epoch}: val loss {validate(model, x_val, y_val, criterion):.6f}")


if __name__ == "__main__":
    main()
