"""Triton implementations of fusedtrain's optimizer ops, the linear + MSE op and the layer-stack
ops (needs the optional `triton` package).

Same signatures, results and in-place effects as fusedtrain.reference; see fusedtrain.triton.optim,
fusedtrain.triton.linear_mse and fusedtrain.triton.stacks for the designs."""

from fusedtrain.triton.linear_mse import linear_mse_fwd_bwd
from fusedtrain.triton.optim import adam_step_, sgd_step_
from fusedtrain.triton.stacks import stack_adam_step_, stack_fwd_bwd, stack_sgd_step_

__all__ = ["adam_step_", "linear_mse_fwd_bwd", "sgd_step_", "stack_adam_step_", "stack_fwd_bwd",
           "stack_sgd_step_"]
