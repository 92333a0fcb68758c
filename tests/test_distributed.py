"""fusedtrain.optim under torch.distributed, in two spawned processes: DDP and
ZeroRedundancyOptimizer land on the params of a single-process run on the whole batch; under FSDP2
and with DTensor params the kernels update each rank's local shards, and params and state
gathered whole equal the single-process run's.

Both processes run every scenario once per backend (distributed_worker.py); the tests compare
what each rank saved against single-process torch.optim and fusedtrain runs made here.
gloo runs on CPU; NCCL needs a CUDA GPU per rank.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedtrain.optim
from distributed_worker import (
    OPTIMIZERS, WORLD_SIZE, full_state, make_batches, make_dtensor_case, make_model, make_optimizer, run,
    train,
)
from helpers import train_side_by_side

BACKENDS = {"gloo": "cpu", "nccl": "cuda"}  # backend: device type of its tensors
# Past this the workers are killed and the tests fail: a hang must not block CI. Well above the
# 10-30 s they take on 2 shared cores; a rank stuck in a collective gives up sooner (30 s).
WORKERS_TIMEOUT_S = 150


def skip_reason(backend: str) -> str | None:
    if not dist.is_available():
        return "this torch is built without torch.distributed"
    if backend == "gloo" and not dist.is_gloo_available():
        return "this torch is built without gloo"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return "this torch is built without NCCL"
        if torch.cuda.device_count() < WORLD_SIZE:
            return f"NCCL needs a CUDA GPU per rank: {WORLD_SIZE} needed, {torch.cuda.device_count()} found"
    return None


class Runs:
    """What each rank saved, scenario by scenario, and why the workers stopped early, if they did."""

    def __init__(self, ranks: list[dict], stopped: str | None):
        self.ranks = ranks
        self.stopped = stopped

    def results(self, scenario: str) -> list:
        """The scenario's result on every rank; fails the test with every rank's error otherwise."""
        problems = []
        for rank, saved in enumerate(self.ranks):
            entry = saved.get(scenario)
            if entry is None:
                problems.append(f"rank {rank} did not run {scenario}: "
                                + (self.stopped or "an earlier scenario failed (see its test)"))
            elif "error" in entry:
                problems.append(f"{scenario} failed on rank {rank}:\n{entry['error']}")
        if problems:
            pytest.fail("\n".join(problems))
        return [saved[scenario]["result"] for saved in self.ranks]


@pytest.fixture(scope="module", params=list(BACKENDS))
def runs(request, tmp_path_factory) -> Runs:
    backend = request.param
    reason = skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp(f"distributed-{backend}")
    context = mp.start_processes(run, args=(WORLD_SIZE, backend, BACKENDS[backend], str(out / "init"), str(out)),
                                 nprocs=WORLD_SIZE, join=False, start_method="spawn")
    stopped = None
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                stopped = f"the workers were killed after {WORKERS_TIMEOUT_S} s"
                break
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        stopped = f"a worker died: {e}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    ranks = []
    for rank in range(WORLD_SIZE):
        path = out / f"rank{rank}.pt"
        ranks.append(torch.load(path, map_location="cpu") if path.exists() else {})
    return Runs(ranks, stopped)


def single_process(module, name: str):
    """OPTIMIZERS[name] from `module` trained in this process on whole batches: (model, optimizer)."""
    model = make_model()
    optimizer = make_optimizer(module, name, model.parameters(), **reference_options(module))
    train(model, optimizer, make_batches())
    return model, optimizer


def reference_options(module) -> dict:
    return {"foreach": False} if module is torch.optim else {}


def detached(params) -> list[torch.Tensor]:
    return [p.detach() for p in params]


def assert_states_close(actual: list[dict], expected: list[dict]) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for key in e:
            torch.testing.assert_close(a[key], e[key], msg=lambda m: f"state['{key}']: {m}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_ddp_matches_a_single_process_on_the_whole_batch(runs, name):
    ranks = runs.results(f"ddp-{name}")
    for p0, p1 in zip(ranks[0], ranks[1], strict=True):
        assert torch.equal(p0, p1), "DDP replicas diverged"
    for module in (torch.optim, fusedtrain.optim):
        model, _ = single_process(module, name)
        torch.testing.assert_close(ranks[0], detached(model.parameters()))


@pytest.mark.parametrize("scenario", ["zero", "zero-bucket-view"])
def test_zero_redundancy_optimizer_of_fusedtrain_adam(runs, scenario):
    """Params as a single process's; the state_dict consolidated on rank 0 is torch.optim.Adam's,
    and training resumed from it in a single process goes on as torch.optim.Adam's does."""
    ranks = runs.results(scenario)
    model, torch_opt = single_process(torch.optim, "Adam")
    torch_params = list(model.parameters())
    assert all(r["local_params"] > 0 for r in ranks), "a rank's fusedtrain Adam got no params"
    assert sum(r["local_params"] for r in ranks) == len(torch_params)
    for r in ranks:
        torch.testing.assert_close(r["params"], detached(torch_params))

    state_dict = ranks[0]["state_dict"]
    assert_states_close([state_dict["state"][i] for i in range(len(torch_params))],
                        full_state(torch_opt, torch_params))
    resumed_params = [torch.nn.Parameter(p.clone()) for p in ranks[0]["params"]]
    resumed = make_optimizer(fusedtrain.optim, "Adam", resumed_params)
    resumed.load_state_dict(state_dict)
    train_side_by_side(torch_opt, resumed, torch_params, resumed_params, steps=3, seed=1)
    torch.testing.assert_close(detached(resumed_params), detached(torch_params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_steps_update_the_local_shards(runs, name):
    """FSDP2's params, gradients and state are sharded DTensors; gathered whole after training,
    params and state are a single process's."""
    ranks = runs.results(f"fsdp2-{name}")
    for module in (torch.optim, fusedtrain.optim):
        model, optimizer = single_process(module, name)
        params = list(model.parameters())
        for r in ranks:
            torch.testing.assert_close(r["params"], detached(params))
            assert_states_close(r["state"], full_state(optimizer, params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dtensor_params_update_their_local_shards(runs, name):
    """distribute_tensor params: uneven, empty and dim-1 shards, a replicated param, and a
    gradient placed otherwise than its param (redistributed first, as torch's DTensor ops do)."""
    ranks = runs.results(f"dtensor-{name}")
    initial, step_grads = make_dtensor_case()
    for module in (torch.optim, fusedtrain.optim):
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        optimizer = make_optimizer(module, name, params, **reference_options(module))
        for grads in step_grads:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        for r in ranks:
            torch.testing.assert_close(r["params"], detached(params))
            assert_states_close(r["state"], full_state(optimizer, params))


# What each refusal must say, after "<optimizer>: ".
REFUSALS = {
    "replicated exp_avg of a sharded param": "state['exp_avg'] of param 0 of param group 1 is a DTensor "
                                             "placed as (Replicate(),)",
    "plain gradient of a sharded param": "a param that is a DTensor placed as (Shard(dim=0),)",
    "DTensor gradient of a plain param": "a param that is not a DTensor has a gradient that is a DTensor",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_dtensor_laid_out_unlike_its_param_is_refused_before_any_update(runs, case):
    for r in runs.results("dtensor-bad-layouts"):
        assert r[case]["error"] is not None, f"the step took a {case}"
        assert REFUSALS[case] in r[case]["error"]
        assert r[case]["unchanged"], "a param changed before the refusal"
