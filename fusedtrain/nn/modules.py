"""nn.Module forms of the fused loss heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusedtrain.nn import functional


class LinearMSELoss(nn.Module):
    """``nn.Linear(in_features, out_features)`` followed by ``nn.MSELoss(reduction)``, fused.

    ``weight`` and ``bias`` are initialised and named as in nn.Linear, so state_dicts load both
    ways. ``forward(x, target)`` returns the loss; ``predict(x)`` the linear layer's output.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 reduction: str = "mean", device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.reduction = reduction
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)  # nn.Linear's initialisation, on the same attributes

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return functional.linear_mse_loss(x, self.weight, self.bias, target, self.reduction)

    def predict(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, reduction={self.reduction}")


class MSELoss(nn.MSELoss):
    """Drop-in for ``nn.MSELoss`` (same arguments) that computes its gradient in the forward pass."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.mse_loss(input, target, reduction=self.reduction)
