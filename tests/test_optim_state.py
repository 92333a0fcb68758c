"""State and the torch.optim API around step(): state_dict both ways mid-training, LR
schedulers, GradScaler, printing and deepcopy."""

import copy

import pytest
import torch

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
