"""Triton implementations of fusedtrain's optimizer ops and of the linear + MSE ops (needs the
optional `triton` package).

Same signatures, results and in-place effects as fusedtrain.reference; see fusedtrain.triton.optim,
fusedtrain.triton.linear_mse and fusedtrain.triton.train_step for the designs."""

from fusedtrain.triton.linear_mse import linear_mse_fwd_bwd
from fusedtrain.triton.optim import adam_step_, sgd_step_
from fusedtrain.triton.train_step import linear_mse_train_step_

__all__ = ["adam_step_", "linear_mse_fwd_bwd", "linear_mse_train_step_", "sgd_step_"]
