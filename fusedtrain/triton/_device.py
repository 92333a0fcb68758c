"""What every Triton launch of fusedtrain needs on a device.

* A device guard: a Triton kernel launches on the current CUDA device, with that device's
  current stream, whatever device its tensors are on. Tensors on cuda:1 while cuda:0 is current
  would be addressed from the wrong device (an illegal access, or peer memory touched behind the
  caller's back), so every launch runs with the tensors' device made current.
* Small tables built on the host (addresses, chunk lists, hyperparameters) brought to the device
  without a host synchronization: torch's blocking host-to-device copy waits for the stream
  after the copy, so the tables travel from pinned memory with non_blocking=True; the caching
  host allocator keeps the pinned block until the copy has run.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def device_guard(device: torch.device):
    """A context in which `device` is the current CUDA device (nothing to do for the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def host_table(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`values` (nested lists of numbers) as a tensor on `device`, copied without waiting."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_device(table: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor built on the host, on `device`, copied without waiting."""
    if device.type == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)
