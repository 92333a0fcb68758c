"""What the processes of test_distributed.py run: every scenario under torch.distributed, each
rank saving what it ends with; and the model, data and training loop that the test's
single-process references share with them."""

from __future__ import annotations

import datetime
import functools
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import fusedtrain.optim

WORLD_SIZE = 2
SEED = 0
STEPS = 5
BATCH = 8  # each rank trains on its BATCH // WORLD_SIZE rows of every batch
# A rank left waiting in a collective (its peer failed or crashed) fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)

# name: (class name in torch.optim and fusedtrain.optim, constructor arguments)
OPTIMIZERS = {
    "Adam": ("Adam", {"lr": 1e-2, "amsgrad": True}),
    "AdamW": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    "SGD": ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
}

# DTensor params: (shape, shard dim of the param, shard dim of its gradient), None = replicated.
# Uneven shards, a shard dim other than 0, a rank whose shard is empty, a replicated param, and a
# gradient placed otherwise than its param.
DTENSOR_PARAMS = [
    ((17, 9), 0, 0),
    ((6, 5), 1, 1),
    ((1,), 0, 0),
    ((4, 3), None, None),
    ((7,), 0, None),
]


def make_model(device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    ).to(device)


def make_batches(device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED + 1)
    return [(torch.randn(BATCH, 6, generator=g).to(device), torch.randn(BATCH, 3, generator=g).to(device))
            for _ in range(STEPS)]


def make_optimizer(module, name: str, params, **extra) -> torch.optim.Optimizer:
    """OPTIMIZERS[name] from `module` (torch.optim or fusedtrain.optim)."""
    class_name, kwargs = OPTIMIZERS[name]
    return getattr(module, class_name)(params, **kwargs, **extra)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, rank: int = 0,
          world_size: int = 1) -> None:
    """Mean-reduced MSE on this rank's share of every batch: the mean of the ranks' gradients,
    which DDP, ZeRO and FSDP2 take, is then the gradient of the whole batch."""
    for x, y in batches:
        optimizer.zero_grad()
        out = model(x.chunk(world_size)[rank])
        torch.nn.functional.mse_loss(out, y.chunk(world_size)[rank]).backward()
        optimizer.step()


def make_dtensor_case() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial values of the DTENSOR_PARAMS, and their gradients for each of STEPS steps."""
    g = torch.Generator().manual_seed(SEED + 2)
    initial = [torch.randn(shape, generator=g) for shape, _, _ in DTENSOR_PARAMS]
    grads = [[torch.randn(shape, generator=g) for shape, _, _ in DTENSOR_PARAMS] for _ in range(STEPS)]
    return initial, grads


def full_state(optimizer: torch.optim.Optimizer, params) -> list[dict[str, torch.Tensor]]:
    """Each param's optimizer state, DTensors gathered whole (a collective: every rank calls it)."""
    return [{key: _full(value) for key, value in optimizer.state[p].items()} for p in params]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# --- the scenarios: each returns what this rank ends with ---------------------------------------

def ddp(name: str, rank: int, world_size: int, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(device))
    optimizer = make_optimizer(fusedtrain.optim, name, model.parameters())
    train(model, optimizer, make_batches(device), rank, world_size)
    return [p.detach().clone() for p in model.parameters()]


def zero(bucket_view: bool, rank: int, world_size: int, device: torch.device):
    """ZeroRedundancyOptimizer over fusedtrain Adam: each rank's Adam steps its own partition of
    the params; the state_dict gathered on rank 0 is the whole model's."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(device))
    _, kwargs = OPTIMIZERS["Adam"]
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fusedtrain.optim.Adam,
                                        parameters_as_bucket_view=bucket_view, **kwargs)
    train(model, optimizer, make_batches(device), rank, world_size)
    local_params = sum(len(g["params"]) for g in optimizer.optim.param_groups)
    optimizer.consolidate_state_dict(to=0)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "local_params": local_params,
        "state_dict": optimizer.state_dict() if rank == 0 else None,
    }


def fsdp2(name: str, rank: int, world_size: int, device: torch.device):
    """FSDP2: params, gradients and optimizer state are DTensors sharded on dim 0."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = make_optimizer(fusedtrain.optim, name, model.parameters())
    train(model, optimizer, make_batches(device), rank, world_size)
    params = list(model.parameters())
    return {"params": [_full(p) for p in params], "state": full_state(optimizer, params)}


def _dtensor_params(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def distribute(t: torch.Tensor, shard_dim: int | None):
        return distribute_tensor(t.to(device), mesh, [Replicate() if shard_dim is None else Shard(shard_dim)])

    initial, grads = make_dtensor_case()
    params = [torch.nn.Parameter(distribute(t, dim)) for t, (_, dim, _) in zip(initial, DTENSOR_PARAMS)]
    step_grads = [[distribute(g, dim) for g, (_, _, dim) in zip(step, DTENSOR_PARAMS)] for step in grads]
    return params, step_grads, distribute


def dtensor(name: str, rank: int, world_size: int, device: torch.device):
    """DTensor params and gradients built directly with distribute_tensor."""
    params, step_grads, _ = _dtensor_params(device)
    optimizer = make_optimizer(fusedtrain.optim, name, params)
    for grads in step_grads:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return {"params": [_full(p) for p in params], "state": full_state(optimizer, params)}


def dtensor_bad_layouts(rank: int, world_size: int, device: torch.device):
    """Gradients and state that a step must refuse, each in the second of two param groups:
    the error must come before the first group's kernel runs, so no param changes."""
    params, step_grads, distribute = _dtensor_params(device)
    sharded, other = params[0], params[1]
    plain = torch.nn.Parameter(torch.ones(3, device=device))

    def local_copies(*tensors):
        return [(t.to_local() if hasattr(t, "to_local") else t).detach().clone() for t in tensors]

    def refusal(optimizer, second_group_param, grad):
        before = local_copies(other, second_group_param)
        other.grad, second_group_param.grad = step_grads[1][1], grad
        try:
            optimizer.step()
            error = None
        except RuntimeError as e:
            error = str(e)
        after = local_copies(other, second_group_param)
        return {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}

    # A state_dict that gives the sharded param a replicated exp_avg.
    optimizer = fusedtrain.optim.Adam([{"params": [other]}, {"params": [sharded]}])
    other.grad, sharded.grad = step_grads[0][1], step_grads[0][0]
    optimizer.step()
    state_dict = optimizer.state_dict()
    state_dict["state"][1]["exp_avg"] = distribute(state_dict["state"][1]["exp_avg"].full_tensor(), None)
    optimizer.load_state_dict(state_dict)
    return {
        "replicated exp_avg of a sharded param": refusal(optimizer, sharded, step_grads[1][0]),
        "plain gradient of a sharded param": refusal(
            fusedtrain.optim.SGD([{"params": [other]}, {"params": [sharded]}], lr=0.1),
            sharded, step_grads[1][0].full_tensor()),
        "DTensor gradient of a plain param": refusal(
            fusedtrain.optim.SGD([{"params": [other]}, {"params": [plain]}], lr=0.1),
            plain, distribute(torch.ones(3), None)),
    }


SCENARIOS = {
    **{f"ddp-{name}": functools.partial(ddp, name) for name in OPTIMIZERS},
    "zero": functools.partial(zero, False),
    "zero-bucket-view": functools.partial(zero, True),
    **{f"fsdp2-{name}": functools.partial(fsdp2, name) for name in OPTIMIZERS},
    **{f"dtensor-{name}": functools.partial(dtensor, name) for name in OPTIMIZERS},
    "dtensor-bad-layouts": dtensor_bad_layouts,
}


def run(rank: int, world_size: int, backend: str, device_type: str, init_file: str, out_dir: str) -> None:
    """Entry point of each spawned process. Saves {scenario: {"result": ...} or {"error": traceback}}
    to out_dir/rank<rank>.pt after every scenario, so a crash still leaves the earlier ones; stops
    at the first error, since the peer may be waiting in that scenario's collectives."""
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=Path(init_file).as_uri(), rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    results: dict[str, dict] = {}
    path = Path(out_dir) / f"rank{rank}.pt"
    partial = path.with_suffix(".partial")  # renamed into place: a killed worker leaves no torn file
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = {"result": scenario(rank, world_size, device)}
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            torch.save(results, partial)
            partial.replace(path)
            if "error" in results[name]:
                break
    finally:
        dist.destroy_process_group()
