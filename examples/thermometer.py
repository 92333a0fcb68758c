"""The thermometer of "Deep Learning with PyTorch" (chapters 5 and 6): fit t_c = w * t_u + b to
eleven readings, with SGD on normalized inputs and then with Adam on the raw ones. fusedtrain's
optimizers drop into the book's training loop unchanged; fusedtrain.fit runs the same loop natively.

    python examples/thermometer.py [--epochs 3000]
"""

import argparse

import torch
from torch import nn

import fusedtrain
# from torch.optim import SGD, Adam   <- stock
from fusedtrain.optim import SGD, Adam  # the one-line swap
from fusedtrain.workloads import thermometer, thermometer_model


def training_loop(n_epochs, optimizer, model, t_u, t_c):
    losses = []
    for epoch in range(1, n_epochs + 1):
        t_p = model(t_u)
        loss = nn.functional.mse_loss(t_p, t_c)

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        losses.append(loss.item())
        if epoch <= 3 or epoch % 1000 == 0:
            print(f"Epoch {epoch}, Loss {losses[-1]:f}")
    return losses


def report(name, losses, w, b):
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; t_c = w * t_u + b with w = {w:.4f}, b = {b:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3000)
    args = parser.parse_args()
    t_u, t_c = thermometer()

    # Plain SGD diverges on the raw readings (their gradient for w is ~50x that for b):
    # the book rescales them to t_un = 0.1 * t_u, so the fitted w is 10x the raw one.
    t_un = 0.1 * t_u
    print("SGD, lr=1e-2, on t_un = 0.1 * t_u")
    model = thermometer_model()  # nn.Linear(1, 1) starting at w = 1, b = 0
    optimizer = SGD(model.parameters(), lr=1e-2)
    losses = training_loop(args.epochs, optimizer, model, t_un, t_c)
    report("SGD", losses, 0.1 * model.weight.item(), model.bias.item())

    # Adam scales each parameter's step by its own gradient history, so raw inputs are fine.
    print("Adam, lr=1e-1, on the raw t_u")
    model = thermometer_model()
    optimizer = Adam(model.parameters(), lr=1e-1)
    losses = training_loop(args.epochs, optimizer, model, t_u, t_c)
    report("Adam", losses, model.weight.item(), model.bias.item())

    # The same Adam loop, every epoch in one native call.
    fit_model = thermometer_model()
    fit_optimizer = Adam(fit_model.parameters(), lr=1e-1)
    history = fusedtrain.fit(fit_model, fit_optimizer, t_u, t_c, epochs=args.epochs)
    report("fusedtrain.fit (Adam)", history.train_loss.tolist(),
           fit_model.weight.item(), fit_model.bias.item())
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), fit_model.parameters()))
    print(f"largest difference between the loop's and fit's params: {gap:.3g}")


if __name__ == "__main__":
    main()
