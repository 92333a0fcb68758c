"""y = 2x + 1 with nn.Linear(1, 1), nn.MSELoss and SGD: the first regression of most PyTorch
tutorials, on 100 noisy points. The stock loop with fusedtrain's SGD swapped in, then the same
training as one fused step per epoch (fusedtrain.FusedTrainStep) and as one native call
(fusedtrain.fit).

    python examples/linear_regression.py [--epochs 1000]
"""

import argparse
import copy

import torch
from torch import nn

import fusedtrain
# from torch.optim import SGD   <- stock
from fusedtrain.optim import SGD  # the one-line swap
from fusedtrain.workloads import noisy_line


def report(name, model, loss):
    print(f"{name}: loss {loss:.4f}, w = {model.weight.item():.4f}, b = {model.bias.item():.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = noisy_line(100)  # x = linspace(0, 10), y = 2x + 1 + noise, as (100, 1) columns

    model = nn.Linear(1, 1)
    step_model, fit_model = copy.deepcopy(model), copy.deepcopy(model)  # the same start for all three
    criterion = nn.MSELoss()
    optimizer = SGD(model.parameters(), lr=args.lr)
    for epoch in range(1, args.epochs + 1):
        optimizer.zero_grad()
        outputs = model(x)
        loss = criterion(outputs, y)
        loss.backward()
        optimizer.step()
        if epoch % (args.epochs // 5 or 1) == 0:
            print(f"Epoch [{epoch}/{args.epochs}], Loss: {loss.item():.4f}")
    report("training loop", model, loss.item())

    # The four lines of the step (zero_grad, forward + loss, backward, step) in one native call.
    step = fusedtrain.FusedTrainStep(step_model, SGD(step_model.parameters(), lr=args.lr))
    for _ in range(args.epochs):
        loss = step(x, y)
    report("FusedTrainStep", step_model, loss.item())

    # The whole loop in one native call.
    history = fusedtrain.fit(fit_model, SGD(fit_model.parameters(), lr=args.lr), x, y, epochs=args.epochs)
    report("fusedtrain.fit", fit_model, history.train_loss[-1].item())


if __name__ == "__main__":
    main()
