"""Fused loss heads: drop-ins for a linear layer followed by MSE, and for nn.MSELoss."""

from fusedtrain.nn import functional
from fusedtrain.nn.modules import LinearMSELoss, MSELoss

__all__ = ["functional", "LinearMSELoss", "MSELoss"]
