"""fusedtrain: fused kernels for the PyTorch training loop.

    from fusedtrain.optim import Adam      # was: from torch.optim import Adam
"""

__version__ = "0.1.0"

from fusedtrain import _extension  # noqa: F401  (loads the ops; warns once if they are missing)
from fusedtrain import nn, optim, reference  # noqa: E402
from fusedtrain.train import FitHistory, FusedTrainStep, fit  # noqa: E402

__all__ = ["nn", "optim", "reference", "FitHistory", "FusedTrainStep", "fit", "__version__"]
