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


def _any_dtensor(tensors, dtensor: type) -> bool:
    """Whether any of `tensors` is a DTensor, at C speed over the list: steps over many small
    tensors pay for every Python-level test per tensor."""
    return any(issubclass(kind, dtensor) for kind in set(map(type, tensors)))


def has_dtensor(tensors: list[Tensor]) -> bool:
    """Whether any of `tensors` is a DTensor: a kernel call over them then goes through
    on_local_shards, decided once when the call is planned."""
    dtensor = _dtensor_class()
    return dtensor is not None and _any_dtensor(tensors, dtensor)


def _layout(t: Tensor, dtensor: type) -> str:
    return f"a DTensor placed as {t.placements} on {t.device_mesh}" if isinstance(t, dtensor) else "not a DTensor"


def check_grads(optimizer: str, params: list[Tensor]) -> None:
    """A DTensor param needs a DTensor gradient (placed as it or not: it is redistributed), a plain
    param a plain one; checked when a group's plan is built, before the step mutates anything."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    for p in params:
        if isinstance(p.grad, dtensor) != isinstance(p, dtensor):
            raise RuntimeError(f"{optimizer}: a param that is {_layout(p, dtensor)} has a gradient "
                               f"that is {_layout(p.grad, dtensor)}")


def check_state_layout(optimizer: str, value: Tensor, key: str, param: Tensor, where: str) -> None:
    """State updated element by element with `param` must be laid out as it: a DTensor placed as
    the param (state is updated in place, so it cannot be redistributed), or plain beside plain."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    if isinstance(value, dtensor) != isinstance(param, dtensor) or (
        isinstance(param, dtensor)
        and (value.device_mesh != param.device_mesh or value.placements != param.placements)
    ):
        raise RuntimeError(f"{optimizer}: state['{key}'] of {where} is {_layout(value, dtensor)} but "
                           f"the param is {_layout(param, dtensor)}")


def on_local_shards(kernel: Callable[..., None]) -> Callable[..., None]:
    """`kernel`, an optimizer op called as kernel(params, grads, *rest), made to take DTensor
    params, gradients and state (checked above) by their local tensors; unchanged while no
    DTensor type exists."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return kernel

    def local(t: Tensor) -> Tensor:
        return t.to_local() if isinstance(t, dtensor) else t

    def call(params: list[Tensor], grads: list[Tensor], *rest):
        if not _any_dtensor(params, dtensor):  # their gradients are plain: see check_grads
            return kernel(params, grads, *rest)
        # A gradient placed otherwise than its param (a Partial gradient of a replicated param
        # under tensor parallelism) is first brought to the param's placements, as torch.optim's
        # DTensor ops do implicitly.
        grads = [g.redistribute(p.device_mesh, p.placements)
                 if isinstance(p, dtensor) and (g.device_mesh, g.placements) != (p.device_mesh, p.placements)
                 else g for g, p in zip(grads, params)]
        return kernel([local(p) for p in params], [local(g) for g in grads],
                      *([local(t) for t in arg] if isinstance(arg, list) else arg for arg in rest))

    return call
