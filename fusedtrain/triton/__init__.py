"""Triton implementations of fusedtrain's optimizer ops (needs the optional `triton` package).

Same signatures and in-place effects as fusedtrain.reference; see fusedtrain.triton.optim for the
design."""

from fusedtrain.triton.optim import adam_step_, sgd_step_

__all__ = ["adam_step_", "sgd_step_"]
