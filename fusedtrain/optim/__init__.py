"""Drop-in replacements for torch.optim.SGD, Adam and AdamW whose step() is one fused
multi-tensor kernel call per device."""

from fusedtrain.optim.adam import Adam, AdamW
from fusedtrain.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
