"""Checkpoint mid-training (torch.save of the model's, optimizer's and scheduler's state_dicts),
load into fresh objects, train on: the result is bit-identical to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
import fusedtrain.optim

STEPS = 24
CONFIGS = [
    ("Adam", {"lr": 0.01, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "maximize": False}),
    ("AdamW", {"lr": 0.01, "betas": (0.8, 0.99)}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]


def config_id(value):
    return value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items())


def batch(step: int):
    """The batch of a step, the same whichever process or object asks for it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(16, 2, generator=g)


class Run:
    """A small MLP, its fusedtrain optimizer and an LR scheduler; init_seed sets the fresh
    weights, which a loaded checkpoint must replace entirely."""

    def __init__(self, name: str, config: dict, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.opt = getattr(fusedtrain.optim, name)(self.model.parameters(), **config)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=config["lr"], total_steps=STEPS)

    def train(self, steps: range) -> None:
        for step in steps:
            x, y = batch(step)
            self.opt.zero_grad()
            F.mse_loss(self.model(x), y).backward()
            self.opt.step()
            self.sched.step()

    def save(self, path) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict()}, path)

    def load(self, path) -> None:
        checkpoint = torch.load(path)  # weights_only: state_dicts need nothing more
        self.model.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["optimizer"])
        self.sched.load_state_dict(checkpoint["scheduler"])


def assert_bit_identical(resumed_model, resumed_opt, straight_model, straight_opt) -> None:
    for (name, a), b in zip(resumed_model.state_dict().items(), straight_model.state_dict().values()):
        assert torch.equal(a, b), name
    resumed, straight = resumed_opt.state_dict(), straight_opt.state_dict()
    assert resumed["param_groups"] == straight["param_groups"]
    assert resumed["state"].keys() == straight["state"].keys()
    for index, entries in straight["state"].items():
        assert resumed["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            assert torch.equal(resumed["state"][index][key], value), (index, key)


@pytest.mark.parametrize("name,config", CONFIGS, ids=config_id)
def test_resumed_training_equals_the_uninterrupted_run(name, config, tmp_path):
    straight = Run(name, config, init_seed=0)
    straight.train(range(STEPS))

    first = Run(name, config, init_seed=0)
    first.train(range(STEPS // 2))
    first.save(tmp_path / "checkpoint.pt")
    del first
    resumed = Run(name, config, init_seed=1)
    resumed.load(tmp_path / "checkpoint.pt")
    resumed.train(range(STEPS // 2, STEPS))

    assert resumed.sched.get_last_lr() == straight.sched.get_last_lr()
    assert_bit_identical(resumed.model, resumed.opt, straight.model, straight.opt)


def linear_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g)
    return x, x @ torch.randn(5, 2, generator=g) + 0.1 * torch.randn(40, 2, generator=g)


def linear_run(name: str, config: dict, init_seed: int):
    torch.manual_seed(init_seed)
    model = torch.nn.Linear(5, 2)
    return model, getattr(fusedtrain.optim, name)(model.parameters(), **config)


def save_and_load_fresh(model, opt, name, config, path, extra=None):
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **(extra or {})}, path)
    fresh_model, fresh_opt = linear_run(name, config, init_seed=1)
    checkpoint = torch.load(path)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    return fresh_model, fresh_opt, checkpoint


needs_native = pytest.mark.skipif(not fusedtrain._extension.native_available(), reason="native extension not built")


@needs_native
@pytest.mark.parametrize("name,config", CONFIGS, ids=config_id)
def test_fused_train_step_resumes(name, config, tmp_path):
    x, y = linear_problem(2)
    straight_model, straight_opt = linear_run(name, config, init_seed=0)
    step = fusedtrain.FusedTrainStep(straight_model, straight_opt)
    straight_losses = [step(x, y) for _ in range(STEPS)]

    model, opt = linear_run(name, config, init_seed=0)
    step = fusedtrain.FusedTrainStep(model, opt)
    losses = [step(x, y) for _ in range(STEPS // 2)]
    model, opt, _ = save_and_load_fresh(model, opt, name, config, tmp_path / "checkpoint.pt")
    step = fusedtrain.FusedTrainStep(model, opt)
    losses += [step(x, y) for _ in range(STEPS // 2, STEPS)]

    assert torch.equal(torch.stack(losses), torch.stack(straight_losses))
    assert_bit_identical(model, opt, straight_model, straight_opt)


@needs_native
@pytest.mark.parametrize("name,config", CONFIGS[::2], ids=config_id)
def test_fit_resumes_with_its_shuffling_generator(name, config, tmp_path):
    """fit for 6 epochs, checkpoint (with the generator's state), fit 6 more: as 12 at once."""
    x, y = linear_problem(3)
    val = linear_problem(4)
    straight_model, straight_opt = linear_run(name, config, init_seed=0)
    straight = fusedtrain.fit(straight_model, straight_opt, x, y, epochs=12, batch_size=7, shuffle=True,
                              generator=torch.Generator().manual_seed(5), val=val)

    model, opt = linear_run(name, config, init_seed=0)
    generator = torch.Generator().manual_seed(5)
    first = fusedtrain.fit(model, opt, x, y, epochs=6, batch_size=7, shuffle=True, generator=generator, val=val)
    model, opt, checkpoint = save_and_load_fresh(model, opt, name, config, tmp_path / "checkpoint.pt",
                                                 {"generator": generator.get_state()})
    generator = torch.Generator()
    generator.set_state(checkpoint["generator"])
    second = fusedtrain.fit(model, opt, x, y, epochs=6, batch_size=7, shuffle=True, generator=generator, val=val)

    assert torch.equal(torch.cat([first.train_loss, second.train_loss]), straight.train_loss)
    assert torch.equal(torch.cat([first.val_loss, second.val_loss]), straight.val_loss)
    assert_bit_identical(model, opt, straight_model, straight_opt)
