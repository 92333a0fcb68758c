"""torch.compile traces the ops through their fake kernels (aot_eager: the fake kernels and
functionalization are exercised without paying for code generation)."""

import pytest
import torch
import torch._dynamo.testing

import fusedtrain
import fusedtrain.optim
from fusedtrain.nn.functional import linear_mse_loss

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")


def adam_inputs():
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(5, generator=g)], [torch.randn(5, generator=g)], [torch.zeros(5)], [torch.zeros(5)],
            [torch.tensor(0.0)])


def test_compiled_adam_step_equals_eager():
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch.ops.fusedtrain.adam_step_(params, grads, exp_avgs, exp_avg_sqs, [], steps, 0.01, 0.9,
                                        0.999, 1e-8, 0.0, False, False, False)
        return params[0] * 2

    eager, compiled = adam_inputs(), adam_inputs()
    want = step(*eager)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b[0], a[0])


def test_compiled_linear_mse_loss_and_backward():
    x, target = torch.randn(8, 3), torch.randn(8, 2)
    weight = torch.randn(2, 3, requires_grad=True)
    loss_fn = torch.compile(lambda a, w, y: linear_mse_loss(a, w, None, y), backend="aot_eager", fullgraph=True)
    loss = loss_fn(x, weight, target)
    loss.backward()
    want = torch.nn.functional.mse_loss(x @ weight.T, target)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(weight.grad, torch.autograd.grad(want, weight)[0])


# -- fusedtrain.optim under torch.compile. A compiled optimizer step is compared with the same
# optimizer stepped eagerly, and its graph count with torch.optim's under the same scheduler. The
# fused steps run with backend="aot_eager", which also runs the pass that turns changing Python
# floats into graph inputs (a float argument of an op, or torch.tensor(a float), would be
# specialized there, compiling once per value).

SCHEDULERS = {
    "StepLR": lambda opt, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "ExponentialLR": lambda opt, steps: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    # changes beta1 (Adam) or momentum (SGD) at every step too
    "OneCycleLR": lambda opt, steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps + 1),
}
OPTIMIZERS = {"Adam": {"lr": 0.01, "weight_decay": 0.1}, "SGD": {"lr": 0.01, "momentum": 0.9}}


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def run_steps(optimizer_class, name, scheduler, steps, backend=None, lr=None):
    """`steps` training steps of small_model (its step compiled with `backend`, if given) with
    `scheduler`: (params, frames compiled)."""
    model = small_model()
    kwargs = dict(OPTIMIZERS[name], **({"lr": lr} if lr is not None else {}))
    opt = getattr(optimizer_class, name)(model.parameters(), **kwargs)
    schedule = SCHEDULERS[scheduler](opt, steps) if scheduler else None
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend) if backend else None
    step = torch.compile(opt.step, backend=counter, fullgraph=schedule is None) if backend else opt.step
    x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(1)), torch.randn(10, 3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        if schedule is not None:
            schedule.step()
        elif isinstance(lr, torch.Tensor):
            lr.mul_(0.7)  # as a scheduler does to a tensor lr, in place
    return list(model.parameters()), counter.frame_count if counter else None


@pytest.mark.parametrize("name,scheduler", [("Adam", "StepLR"), ("Adam", "ExponentialLR"), ("Adam", "OneCycleLR"),
                                            ("SGD", "StepLR"), ("SGD", "OneCycleLR")])
def test_compiled_step_with_scheduler_equals_eager_without_recompiling(name, scheduler):
    torch._dynamo.reset()
    steps = 6
    eager, _ = run_steps(fusedtrain.optim, name, scheduler, steps)
    compiled, frames = run_steps(fusedtrain.optim, name, scheduler, steps, backend="aot_eager")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a)
    torch._dynamo.reset()
    _, torch_frames = run_steps(torch.optim, name, scheduler, steps, backend="eager")
    assert frames <= torch_frames, (frames, torch_frames)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_step_with_tensor_lr_has_no_graph_break(name):
    """fullgraph=True: no graph break (no .item() of the lr); the lr changed in place is followed."""
    torch._dynamo.reset()
    eager, _ = run_steps(fusedtrain.optim, name, None, 5, lr=torch.tensor(0.01))
    compiled, frames = run_steps(fusedtrain.optim, name, None, 5, backend="aot_eager", lr=torch.tensor(0.01))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a)
    assert frames <= 2  # the first step creates the state, which the second one's guards see


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_training_step_equals_eager(name):
    """forward, loss, backward and opt.step() in one compiled function."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = small_model()
        opt = getattr(fusedtrain.optim, name)(model.parameters(), **OPTIMIZERS[name])
        x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(2)), torch.randn(10, 3)

        def train_step():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        train = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        losses = [train().detach() for _ in range(4)]
        results.append((losses, list(model.parameters())))
    (eager_losses, eager_params), (losses, params) = results
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses))
    for a, b in zip(eager_params, params):
        torch.testing.assert_close(b, a)
