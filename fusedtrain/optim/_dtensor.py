"""DTensor params (FSDP2's fully_shard, tensor parallelism): each rank's kernels update its local
shards. The updates are elementwise, so the new values of a shard need only the same shard of the
gradient and of the state; a DTensor itself has no storage that a kernel could address."""

from __future__ import annotations

import sys
from typing import Callable

from torch import Tensor


def _dtensor_class() -> type | None:
    """DTensor, once torch.distributed.tensor is imported; before that no DTensor can exist, and
    importing it here would add a second to every import of fusedtrain."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def on_local_shards(kernel: Callable[..., None]) -> Callable[..., None]:
    """`kernel`, an optimizer op called as kernel(params, grads, *rest), made to take DTensor
    params, grads and state by their local tensors; unchanged while no DTensor type exists."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return kernel

    def call(params: list[Tensor], grads: list[Tensor], *rest):
        if not any(isinstance(p, dtensor) for p in params):
            return kernel(params, grads, *rest)
        local_params = [p.to_local() if isinstance(p, dtensor) else p for p in params]
        local_grads = [_local_grad(g, p, dtensor) for g, p in zip(grads, params)]
        local_rest = [_local_state(arg, params, dtensor) if isinstance(arg, list) else arg for arg in rest]
        return kernel(local_params, local_grads, *local_rest)

    return call


def _local_grad(grad: Tensor, param: Tensor, dtensor: type) -> Tensor:
    """The gradient's part of the param's local shard. Where the gradient is placed otherwise
    (a Partial gradient of a replicated param under tensor parallelism), it is redistributed to
    the param's placements first, as torch.optim's DTensor ops do implicitly."""
    if not isinstance(param, dtensor):
        return grad
    if not isinstance(grad, dtensor):
        raise RuntimeError(f"a DTensor param has a {type(grad).__name__} gradient; expected a DTensor")
    if grad.device_mesh != param.device_mesh or grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def _local_state(tensors: list[Tensor], params: list[Tensor], dtensor: type) -> list[Tensor]:
    """Local tensors of per-param state that is laid out as its param (exp_avg, momentum_buffer);
    plain tensors (the step counts) pass unchanged. State is updated in place, so it cannot be
    redistributed: a different layout is refused."""
    local = []
    for index, (t, p) in enumerate(zip(tensors, params)):
        if isinstance(t, dtensor):
            if not isinstance(p, dtensor) or t.device_mesh != p.device_mesh or t.placements != p.placements:
                raise RuntimeError(
                    f"optimizer state of param {index} is a DTensor placed as {t.placements} on "
                    f"{t.device_mesh}, but the param is "
                    + (f"placed as {p.placements} on {p.device_mesh}" if isinstance(p, dtensor) else "not a DTensor")
                )
            t = t.to_local()
        local.append(t)
    return local
