"""1e5 training steps hold their memory: the resident set after the loop is within a few MiB of
the one after warm-up, for FusedTrainStep and for a fusedtrain optimizer's step().

The loops run in a fresh interpreter, whose memory is their own; tiny tensors keep each step
to tens of microseconds, so that 1e5 of them fit in a few seconds."""

from __future__ import annotations

import fusedtrain
from child_process import run_python

STEPS = 100_000
WARMUP = 2_000
GROWTH_LIMIT_MIB = 5.0

MEASURE = """
import gc, json, os, time
import torch
import fusedtrain
import fusedtrain.optim

PAGE = os.sysconf("SC_PAGE_SIZE")

def rss_mib():
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20

def measure(step):
    for _ in range({warmup}):
        step()
    before, start = rss_mib(), time.perf_counter()
    for _ in range({steps}):
        step()
    seconds = time.perf_counter() - start
    return {{"before_mib": before, "after_mib": rss_mib(), "us_per_step": seconds / {steps} * 1e6}}

results = {{}}
torch.manual_seed(0)
"""

LOOPS = {
    # the whole training step in one native call, an LR schedule changing its config every step
    "FusedTrainStep-Adam-with-a-scheduler": """
model = torch.nn.Linear(8, 2)
opt = fusedtrain.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
train_step = fusedtrain.FusedTrainStep(model, opt)
x, y = torch.randn(16, 8), torch.randn(16, 2)
def step():
    train_step(x, y)
    sched.step()
""",
    # step() over an MLP's params in two groups, another grad tensor every step as after
    # backward (two sets in turn: drawing new ones would cost more than the step), and the
    # second group without a gradient every third step, so that its plan is rebuilt
    "AdamW-step-with-changing-grads": """
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
params = list(model.parameters())
opt = fusedtrain.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 1e-4}], lr=1e-3)
grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
count = [0]
def step():
    count[0] += 1
    for i, p in enumerate(params):
        p.grad = None if i >= 2 and count[0] % 3 == 0 else grad_sets[count[0] % 2][i]
    opt.step()
""",
    "SGD-momentum-step-with-zero_grad": """
params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 4), (4,), (), (0, 3)]]
opt = fusedtrain.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)
grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
count = [0]
def step():
    count[0] += 1
    opt.zero_grad()
    for p, g in zip(params, grad_sets[count[0] % 2]):
        p.grad = g
    opt.step()
""",
}


def test_long_loops_do_not_grow():
    """All loops in one child, one after the other (an interpreter's start costs as much as a loop)."""
    loops = {name: code for name, code in LOOPS.items()
             if fusedtrain._extension.native_available() or not name.startswith("FusedTrainStep")}
    code = MEASURE.format(warmup=WARMUP, steps=STEPS) + "".join(
        f"{setup}\nresults[{name!r}] = measure(step)\n" for name, setup in loops.items()
    ) + "print(json.dumps(results))\n"
    results = run_python(code, timeout=300)
    assert results.keys() == loops.keys()
    for name, result in results.items():
        print(name, result)  # shown with -s: the sizes and the time per step
        growth = result["after_mib"] - result["before_mib"]
        assert growth < GROWTH_LIMIT_MIB, f"{name}: resident set grew {growth:.1f} MiB over {STEPS} steps ({result})"
