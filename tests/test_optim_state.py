"""State and the torch.optim API around step(): state_dict both ways mid-training, LR
schedulers, GradScaler, printing and deepcopy."""

import collections
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import fusedtrain.optim
from helpers import clone_params, make_params, set_random_grads, train_side_by_side

CONFIGS = {
    "Adam": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    "AdamW": {"lr": 0.01},
    "SGD": {"lr": 0.01, "momentum": 0.9, "nesterov": True},
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_moves_both_ways_and_training_continues(name, direction):
    """Train 50 steps with one implementation, load its state_dict into the other, train 50
    more: the result equals 100 steps of torch.optim alone."""
    kwargs = CONFIGS[name]
    torch_cls, fused_cls = getattr(torch.optim, name), getattr(fusedtrain.optim, name)
    first_cls, second_cls = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)

    straight = make_params(torch.float32, seed=10)
    switched = clone_params(straight)
    straight_opt = torch_cls(straight, foreach=False, **kwargs)
    first_opt = first_cls(switched, **kwargs)
    train_side_by_side(straight_opt, first_opt, straight, switched, 50, seed=11)

    saved = first_opt.state_dict()
    second_opt = second_cls(switched, **kwargs)
    second_opt.load_state_dict(saved)
    assert second_opt.state_dict()["param_groups"] == saved["param_groups"]
    for key, value in saved["state"][0].items():
        assert type(second_opt.state[switched[0]][key]) is type(value)
        assert second_opt.state[switched[0]][key].dtype == value.dtype

    g = torch.Generator().manual_seed(12)
    for _ in range(50):
        set_random_grads([straight, switched], g)
        straight_opt.step()
        second_opt.step()
    for a, b in zip(straight, switched):
        torch.testing.assert_close(b, a)


def test_state_matches_torch_keys_and_types():
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    q.grad = p.grad.clone()
    fused, ref = fusedtrain.optim.Adam([p], amsgrad=True), torch.optim.Adam([q], amsgrad=True)
    fused.step()
    ref.step()
    assert fused.state[p].keys() == ref.state[q].keys()
    for key in ref.state[q]:
        assert fused.state[p][key].dtype == ref.state[q][key].dtype
        assert fused.state[p][key].shape == ref.state[q][key].shape
    assert fused.state_dict()["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2, factor=0.5),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", CONFIGS)
def test_lr_schedulers(name, scheduler):
    """The scheduler drives lr (and OneCycleLR the momentum / beta1) identically."""
    kwargs = dict(CONFIGS[name], lr=0.01)
    torch_params = make_params(torch.float32, seed=20)
    fused_params = clone_params(torch_params)
    torch_opt = getattr(torch.optim, name)(torch_params, foreach=False, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused_params, **kwargs)
    torch_sched, fused_sched = SCHEDULERS[scheduler](torch_opt), SCHEDULERS[scheduler](fused_opt)
    g = torch.Generator().manual_seed(21)
    for step in range(60):
        set_random_grads([torch_params, fused_params], g)
        torch_opt.step()
        fused_opt.step()
        if scheduler == "ReduceLROnPlateau":
            metric = 1.0 if step < 20 else 2.0  # stalls after step 20
            torch_sched.step(metric)
            fused_sched.step(metric)
        else:
            torch_sched.step()
            fused_sched.step()
        assert fused_opt.param_groups[0]["lr"] == torch_opt.param_groups[0]["lr"]
    for a, b in zip(torch_params, fused_params):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_grad_scaler_unscales_and_skips_like_torch_fused(name):
    """torch.amp.GradScaler hands grad_scale/found_inf to the step; an inf gradient skips the
    step and leaves 'step' and all state unchanged, as with torch's fused optimizers."""
    kwargs = CONFIGS[name]
    torch.manual_seed(30)
    torch_model = torch.nn.Linear(8, 2)
    fused_model = copy.deepcopy(torch_model)
    torch_opt = getattr(torch.optim, name)(torch_model.parameters(), fused=True, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused_model.parameters(), **kwargs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    for step in range(30):
        for model, opt, scaler in zip((torch_model, fused_model), (torch_opt, fused_opt), scalers):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if step in (5, 6):
                model.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        if step == 6:
            state = fused_opt.state[fused_model.weight]
            if "step" in state:
                assert state["step"].item() == 5.0
        for a, b in zip(torch_model.parameters(), fused_model.parameters()):
            torch.testing.assert_close(b, a)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10


def test_grad_scaler_skipping_the_first_sgd_step_creates_no_buffer():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = fusedtrain.optim.SGD([p], lr=0.1, momentum=0.9)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert "momentum_buffer" not in opt.state[p]
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_repr_and_deepcopy(name):
    model = torch.nn.Linear(3, 2)
    opt = getattr(fusedtrain.optim, name)(model.parameters(), **CONFIGS[name])
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    text = repr(opt)
    assert text.startswith(f"{name} (") and "lr: 0.01" in text
    twin = copy.deepcopy(opt)
    assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for key, value in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(twin.state_dict()["state"][0][key], value)
    twin_state = twin.state_dict()["state"][0]
    assert all(t.data_ptr() != o.data_ptr() for t, o in zip(twin_state.values(), opt.state_dict()["state"][0].values()))


# -- optimizer.state changed between steps: the next step reads and writes what it holds then, as
# torch.optim does (the cached plans of the fused step must not keep the old tensors).

def assert_same_state(torch_opt, fused_opt):
    want, got = torch_opt.state_dict(), fused_opt.state_dict()
    for groups in (want["param_groups"], got["param_groups"]):
        for group in groups:
            del group["foreach"]  # False for the torch.optim for-loop compared against
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for index, entries in want["state"].items():
        assert got["state"][index].keys() == entries.keys(), index
        for key, value in entries.items():
            torch.testing.assert_close(got["state"][index][key], value, msg=f"{index} {key}")


def train_changing_state(name, change, steps=3, params=None):
    """`steps` steps of torch.optim and fusedtrain side by side, `change(optimizer, params)` on
    both, `steps` more: the params and the state (as state_dict shows it) agree throughout."""
    kwargs = CONFIGS[name]
    torch_params = params if params is not None else make_params(torch.float32, seed=50)
    fused_params = clone_params(torch_params)
    torch_opt = getattr(torch.optim, name)(torch_params, foreach=False, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused_params, **kwargs)
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, steps, seed=51)
    change(torch_opt, torch_params)
    change(fused_opt, fused_params)
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, steps, seed=52)
    for a, b in zip(torch_params, fused_params):
        torch.testing.assert_close(b, a)
    assert_same_state(torch_opt, fused_opt)
    return torch_opt, fused_opt, torch_params, fused_params


STATE_KEYS = {"Adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"], "AdamW": ["exp_avg", "step"],
              "SGD": ["momentum_buffer"]}


@pytest.mark.parametrize("name", CONFIGS)
def test_state_cleared(name):
    train_changing_state(name, lambda opt, params: opt.state.clear())


@pytest.mark.parametrize("name", CONFIGS)
def test_state_reassigned(name):
    def reassign(opt, params):
        opt.state = collections.defaultdict(dict)

    train_changing_state(name, reassign)


@pytest.mark.parametrize("name,key", [(name, key) for name in CONFIGS for key in STATE_KEYS[name]])
def test_state_tensor_replaced(name, key):
    """A state tensor replaced by hand (a one-element 'step' too, which compares equal to the old
    one by value): the step updates the new one, the old one is left alone."""
    replaced = []

    def replace(opt, params):
        old = opt.state[params[0]][key]
        new = torch.full_like(old, 100.0 if key == "step" else 0.125)
        opt.state[params[0]][key] = new
        replaced.append((old, old.clone()))

    train_changing_state(name, replace)
    (torch_old, torch_before), (fused_old, fused_before) = replaced
    assert torch.equal(torch_old, torch_before) and torch.equal(fused_old, fused_before)


@pytest.mark.parametrize("name", CONFIGS)
def test_per_param_state_replaced_and_deleted(name):
    def change(opt, params):
        opt.state[params[0]] = {key: value.clone() for key, value in opt.state[params[0]].items()}
        del opt.state[params[1]]

    train_changing_state(name, change)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_added_for_a_param_without_state(name):
    """A param without a gradient (and so without state) gets state by hand, then a gradient."""
    params = make_params(torch.float32, seed=53)
    late = [torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(54)))]
    torch_params, fused_params = params + late, clone_params(params + late)
    kwargs = CONFIGS[name]
    torch_opt = getattr(torch.optim, name)(torch_params, foreach=False, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused_params, **kwargs)
    train_side_by_side(torch_opt, fused_opt, torch_params[:-1], fused_params[:-1], 3, seed=55)
    for opt, p in ((torch_opt, torch_params[-1]), (fused_opt, fused_params[-1])):
        assert not opt.state[p]
        opt.state[p].update(
            {"momentum_buffer": torch.full_like(p, 0.5)} if name == "SGD" else
            {"step": torch.tensor(4.0), "exp_avg": torch.full_like(p, 0.5), "exp_avg_sq": torch.full_like(p, 0.25),
             **({"max_exp_avg_sq": torch.full_like(p, 0.25)} if kwargs.get("amsgrad") else {})})
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, 3, seed=56)
    for a, b in zip(torch_params, fused_params):
        torch.testing.assert_close(b, a)
    assert_same_state(torch_opt, fused_opt)


@pytest.mark.parametrize("name", CONFIGS)
def test_load_state_dict_of_an_earlier_step_mid_training(name):
    saved = {}

    def rewind(opt, params):
        opt.load_state_dict(saved[id(opt)])

    kwargs = CONFIGS[name]
    torch_params = make_params(torch.float32, seed=57)
    fused_params = clone_params(torch_params)
    torch_opt = getattr(torch.optim, name)(torch_params, foreach=False, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused_params, **kwargs)
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, 2, seed=58)
    for opt in (torch_opt, fused_opt):
        saved[id(opt)] = copy.deepcopy(opt.state_dict())
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, 2, seed=59)
    for opt, params in ((torch_opt, torch_params), (fused_opt, fused_params)):
        rewind(opt, params)
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, 3, seed=60)
    for a, b in zip(torch_params, fused_params):
        torch.testing.assert_close(b, a)
    assert_same_state(torch_opt, fused_opt)


@pytest.mark.parametrize("name", CONFIGS)
def test_param_group_added_mid_training(name):
    extra = make_params(torch.float32, seed=61, shapes=[(4, 5), (7,)])
    copies = {}

    def add_group(opt, params):
        new = extra if not copies else clone_params(extra)
        copies[id(opt)] = new
        opt.add_param_group({"params": new, "lr": 0.05})
        params.extend(new)

    train_changing_state(name, add_group)


@pytest.mark.parametrize("name,key", [("Adam", "exp_avg"), ("Adam", "step"), ("SGD", "momentum_buffer")])
def test_replaced_state_tensor_that_does_not_fit_is_refused_before_any_change(name, key):
    params = make_params(torch.float32, seed=62)
    opt = getattr(fusedtrain.optim, name)([{"params": params[:2]}, {"params": params[2:]}], **CONFIGS[name])
    g = torch.Generator().manual_seed(63)
    for _ in range(2):
        set_random_grads([params], g)
        opt.step()
    opt.state[params[3]][key] = torch.zeros(2) if key != "step" else torch.tensor([1.0, 2.0])
    before = copy.deepcopy(([p.detach() for p in params], opt.state_dict()))
    set_random_grads([params], g)
    message = (r"state\['step'\] of param 1 of param group 1 must be a one-element" if key == "step" else
               rf"state\['{key}'\] of param 1 of param group 1 has shape \(2,\)")
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    for p, value in zip(params, before[0]):
        assert torch.equal(p.detach(), value)
    for index, entries in before[1]["state"].items():
        for k, value in entries.items():
            assert torch.equal(opt.state_dict()["state"][index][k], value), (index, k)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_step_hooks_and_profiler_range_as_torch(name):
    """The fused step records its own profiler range and calls the hooks itself (see
    _base._with_step_hooks); both as torch.optim's wrapper of step() does."""
    seen = {}
    for module in (torch.optim, fusedtrain.optim):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        opt = getattr(module, name)([p], lr=0.1)
        calls = []
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", args[1:], kwargs)))
        # a pre-hook may replace the arguments: here the closure, whose loss step() returns
        opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: torch.tensor(7.0)}))
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args[1:], list(kwargs))))
        handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))
        try:
            with torch.profiler.profile() as prof:
                loss = opt.step()
        finally:
            handle.remove()
        ranges = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
        seen[module] = (calls, loss, ranges, p.detach().clone())
    assert seen[fusedtrain.optim][:3] == seen[torch.optim][:3]
    assert seen[fusedtrain.optim][2] == [f"Optimizer.step#{name}.step"]
    torch.testing.assert_close(seen[fusedtrain.optim][3], seen[torch.optim][3])
