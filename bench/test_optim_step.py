"""Optimizer step() benchmarks: torch.optim (for-loop, foreach, fused) against fusedtrain.optim,
with an in-place add_ of the same total size as the memory-bandwidth reference.

Every group, e.g. `adam-fp32-1x1e7`, is one optimizer (adam, adamw, sgd with momentum 0.9), one
dtype (fp32, bf16) and one workload:

    1x1e5, 1x1e6, 1x1e7, 1x5e7   one tensor of that many elements
    100x1e3, 100x1e4, 100x1e5    100 tensors of that many elements each
    mlp                          the weights and biases of Linear 1024-4096-4096-1024 (25.2M elements)

and holds five variants: torch-loop (foreach=False), torch-foreach, torch-fused (fused=True),
fusedtrain, and add_: an in-place fp32 `a.add_(b)` that moves as many bytes as the optimizer step
(3 streams of 4 bytes per element), the memory bandwidth a plain streaming kernel reaches on this
machine for that working set. It is fp32 in the bf16 groups too: torch's bf16 add_ is limited by
its conversions, not by memory. Only step() is timed, on params whose grads are set once; the
optimizer state is created by a warm-up step first. Each result's extra_info holds "bytes" moved
per step (Adam/AdamW: 7 streams per element, read p, g, m, v and write p, m, v; SGD with
momentum: 5) and "GB/s" = bytes / median.

Run (from the repository root):

    pytest bench/test_optim_step.py --benchmark-only                   # all but 1x5e7, ~5-7 min on 2 cores
    pytest bench/test_optim_step.py --benchmark-only --run-slow        # everything, ~7-9 min
    pytest bench/test_optim_step.py --benchmark-disable                # smoke test: each step once
    pytest bench/test_optim_step.py --benchmark-only --benchmark-json=out.json \\
        -k "(adam-fp32 or adam-bf16 or sgd-fp32) and (1x1e5 or 100x1e3 or 1x1e7)" \\
        --benchmark-min-rounds=5 --benchmark-max-time=0.5             # fast subset, ~1 min
    python bench/summarize.py out.json                                 # Markdown tables for the README

The 1x5e7 groups are marked `slow` and skipped unless --run-slow or FUSEDTRAIN_BENCH_SLOW=1.
`-k` selects by test id `<group>-<variant>`, e.g. `-k "adam-bf16 and mlp"` or `-k fusedtrain`
(note that `adam` also matches `adamw`; `adam-` does not). A table of median, GB/s and the ratios
to torch-fused and add_ per group is printed at the end of a benchmark run (see summarize.py).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import fusedtrain.optim
from fusedtrain import workloads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> (torch.optim / fusedtrain.optim class name, constructor arguments, streams per element)
OPTIMIZERS = {
    "adam": ("Adam", {"lr": 1e-3}, 7),
    "adamw": ("AdamW", {"lr": 1e-3}, 7),
    "sgd": ("SGD", {"lr": 1e-3, "momentum": 0.9}, 5),
}

# name -> extra torch.optim arguments; fusedtrain and add_ are handled separately.
TORCH_VARIANTS = {"torch-loop": {"foreach": False}, "torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}}
VARIANTS = [*TORCH_VARIANTS, "fusedtrain", "add_"]
ADD_STREAMS, ADD_ELEMENT_SIZE = 3, 4  # fp32 a.add_(b): read a, b; write a

WORKLOADS = ["1x1e5", "1x1e6", "1x1e7", "1x5e7", "100x1e3", "100x1e4", "100x1e5", "mlp"]
SLOW_WORKLOADS = {"1x5e7"}


@functools.lru_cache(maxsize=1)
def base_tensors(workload: str, dtype: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, grads) of a workload. Cached for the one workload the tests are currently on, so
    every variant clones the same values while the big workloads are not all held at once."""
    return workloads.optimizer_tensors(workload, DTYPES[dtype])


def make_step(optimizer: str, variant: str, params: list[torch.Tensor], grads: list[torch.Tensor]):
    """step() of a fresh optimizer on clones of `params` with clones of `grads` set, after the
    warm-up step that creates its state."""
    name, kwargs, _ = OPTIMIZERS[optimizer]
    clones = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(clones, grads):
        p.grad = g.clone()
    if variant == "fusedtrain":
        opt = getattr(fusedtrain.optim, name)(clones, **kwargs)
    else:
        opt = getattr(torch.optim, name)(clones, **kwargs, **TORCH_VARIANTS[variant])
    opt.step()
    return opt.step


def case(workload: str, dtype: str, optimizer: str, variant: str):
    marks = [pytest.mark.slow] if workload in SLOW_WORKLOADS else []
    return pytest.param(optimizer, dtype, workload, variant, marks=marks,
                        id=f"{optimizer}-{dtype}-{workload}-{variant}")


# Variants innermost and workloads outermost: consecutive tests share base_tensors' cache entry,
# and only one variant's params and state are alive at a time.
@pytest.mark.parametrize(
    "optimizer, dtype, workload, variant",
    [case(*c) for c in itertools.product(WORKLOADS, DTYPES, OPTIMIZERS, VARIANTS)],
)
def test_step(benchmark, record_result, optimizer, dtype, workload, variant):
    params, grads = base_tensors(workload, dtype)
    numel = sum(p.numel() for p in params)
    bytes_per_step = OPTIMIZERS[optimizer][2] * numel * params[0].element_size()
    if variant == "add_":
        add_numel = bytes_per_step // (ADD_STREAMS * ADD_ELEMENT_SIZE)
        a, b = torch.ones(add_numel), torch.ones(add_numel)
        step = functools.partial(a.add_, b)
    else:
        step = make_step(optimizer, variant, params, grads)
    group = f"{optimizer}-{dtype}-{workload}"
    benchmark.group = group
    benchmark.extra_info["bytes"] = bytes_per_step
    benchmark(step)
    if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = bytes_per_step / median / 1e9
        record_result({"group": group, "variant": variant, "median": median, "bytes": bytes_per_step})
