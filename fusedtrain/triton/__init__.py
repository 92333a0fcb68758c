"""Triton implementations of fusedtrain's optimizer ops and of the linear + MSE op (needs the
optional `triton` package).

Same signatures, results and in-place effects as fusedtrain.reference; see fusedtrain.triton.optim
and fusedtrain.triton.linear_mse for the designs."""

from fusedtrain.triton.linear_mse import linear_mse_fwd_bwd
from fusedtrain.triton.optim import adam_step_, sgd_step_

__all__ = ["adam_step_", "linear_mse_fwd_bwd", "sgd_step_"]
