"""Bad input: the same exception type as torch.optim, a message naming the argument, and
nothing mutated (params, grads and optimizer state as they were)."""

import copy
import re

import pytest
import torch

import fusedtrain.optim

BAD_CONSTRUCTOR_ARGS = [
    ("Adam", {"lr": -0.1}, "learning rate"),
    ("Adam", {"lr": torch.tensor([0.1, 0.2])}, "lr must be 1-element"),
    ("Adam", {"betas": (1.0, 0.999)}, "beta parameter at index 0"),
    ("Adam", {"betas": (0.9, -0.1)}, "beta parameter at index 1"),
    ("Adam", {"eps": -1e-8}, "epsilon"),
    ("Adam", {"weight_decay": -0.1}, "weight_decay"),
    ("AdamW", {"betas": (0.9, 1.5)}, "beta parameter at index 1"),
    ("AdamW", {"lr": -1.0}, "learning rate"),
    ("SGD", {"lr": -0.1}, "learning rate"),
    ("SGD", {"momentum": -0.5}, "momentum"),
    ("SGD", {"weight_decay": -1.0}, "weight_decay"),
    ("SGD", {"nesterov": True}, "Nesterov"),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov"),
]


@pytest.mark.parametrize("name,kwargs,message", BAD_CONSTRUCTOR_ARGS)
def test_bad_hyperparameters_raise_like_torch(name, kwargs, message):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(Exception) as torch_error:
        getattr(torch.optim, name)(params, **kwargs)
    with pytest.raises(type(torch_error.value), match=message):
        getattr(fusedtrain.optim, name)(params, **kwargs)


def test_unknown_backend_is_refused_clearly():
    with pytest.raises(ValueError, match="backend"):
        fusedtrain.optim.Adam([torch.nn.Parameter(torch.randn(3))], backend="gpu-magic")


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", {"fused": True, "differentiable": True}),
    ("SGD", {"fused": True, "differentiable": True}),
    ("AdamW", {"fused": True, "foreach": True}),
    ("SGD", {"fused": True, "foreach": True}),
    ("Adam", {"lr": torch.tensor(0.01), "foreach": True}),
    ("AdamW", {"betas": (torch.tensor(0.9), 0.99)}),
    ("Adam", {"betas": (0.9, 0)}),
    ("Adam", {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}),
])
def test_flags_torch_refuses_are_refused_alike(name, kwargs):
    """foreach and fused do not choose fusedtrain's implementation, but what torch refuses for
    them is refused the same way, so code moves between the two unchanged."""
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(Exception) as torch_error:
        getattr(torch.optim, name)(params, **kwargs)
    with pytest.raises(type(torch_error.value), match=re.escape(str(torch_error.value))):
        getattr(fusedtrain.optim, name)(params, **kwargs)


def test_foreach_and_fused_are_accepted():
    params = [torch.nn.Parameter(torch.randn(3))]
    for flags in ({"foreach": True}, {"fused": True}, {"foreach": False, "fused": False}):
        opt = fusedtrain.optim.Adam(params, **flags)
        assert all(opt.param_groups[0][k] == v for k, v in flags.items())


def trained_optimizer(name, n_params=3):
    """An optimizer with state, two groups, after two steps; grads set for a third."""
    torch.manual_seed(40)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n_params)]
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    opt = getattr(fusedtrain.optim, name)(
        [{"params": params[:1]}, {"params": params[1:]}], **kwargs)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if _ < 2:
            opt.step()
    return opt, params


def snapshot(opt, params):
    return (copy.deepcopy([p.detach() for p in params]), copy.deepcopy([p.grad for p in params]),
            copy.deepcopy(opt.state_dict()))


def assert_unchanged(before, opt, params):
    values, grads, state = before
    for p, v, g in zip(params, values, grads):
        assert torch.equal(p.detach(), v)
        assert torch.equal(p.grad.to_dense(), g.to_dense())
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for index, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(now["state"][index][key], value), key


@pytest.mark.parametrize("data,message", [
    (lambda p: torch.randn(2, 6), r"param 1 of param group 1 has shape \(2, 6\) but its grad has shape \(4, 3\)"),
    (lambda p: p.data.double(), "param 1 of param group 1 is torch.float64 on cpu but its grad is torch.float32"),
])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_grad_that_no_longer_fits_in_a_later_group_mutates_nothing(name, data, message):
    """The groups' step plans are cached by then: the gradient is checked against its param all
    the same (torch refuses to assign one that does not fit; a param's .data can still change)."""
    opt, params = trained_optimizer(name)
    params[2].data = data(params[2])
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grad_in_a_later_group_mutates_nothing(name):
    opt, params = trained_optimizer(name)
    params[2].grad = torch.randn(4, 3).to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(before, opt, params)


def test_sgd_sparse_grad_with_weight_decay_in_a_later_group_mutates_nothing():
    """torch.optim.SGD fails adding the param to a sparse gradient, after updating the params
    before it; fusedtrain raises torch's error before anything moves."""
    opt, params = trained_optimizer("SGD")
    opt.param_groups[1]["weight_decay"] = 0.1
    params[2].grad = torch.randn(4, 3).to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=re.escape("add(sparse, dense) is not supported") +
                       ".*param 1 of param group 1 has a sparse gradient"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("name,key", [("Adam", "exp_avg"), ("Adam", "exp_avg_sq"), ("SGD", "momentum_buffer")])
def test_state_of_the_wrong_size_after_load_state_dict(name, key):
    """A state_dict from a model with other shapes loads (as in torch), then step() refuses
    it, naming the key and the param, before touching anything."""
    opt, params = trained_optimizer(name)
    saved = opt.state_dict()
    saved["state"][2][key] = torch.zeros(5)
    opt.load_state_dict(saved)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=rf"state\['{key}'\] of param 1 of param group 1 has shape \(5,\)"):
        opt.step()
    assert_unchanged(before, opt, params)


def test_missing_amsgrad_state_is_named():
    """A state_dict saved without amsgrad, loaded into an amsgrad optimizer."""
    opt, params = trained_optimizer("Adam")
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["amsgrad"] = True
    opt.load_state_dict(saved)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="state of param 0 of param group 0 has no 'max_exp_avg_sq'"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("op", ["adam_step_", "sgd_step_"])
def test_ops_name_the_bad_argument(op):
    """The ops check every list before touching memory; messages name the list and index."""
    if not fusedtrain._extension.native_available():
        pytest.skip("native extension not built")
    params = [torch.randn(3), torch.randn(4)]
    grads = [torch.randn(3), torch.randn(5)]
    before = [p.clone() for p in params]
    if op == "adam_step_":
        call = lambda: torch.ops.fusedtrain.adam_step_(  # noqa: E731
            params, grads, [torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(4)], [],
            [torch.tensor(0.0), torch.tensor(0.0)], 0.1, 0.9, 0.99, 1e-8, 0.0, False, False, False)
    else:
        call = lambda: torch.ops.fusedtrain.sgd_step_(  # noqa: E731
            params, grads, [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \[5\] but params\[1\] has shape \[4\]"):
        call()
    grads[1] = torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype Double but params\[1\] has dtype Float"):
        call()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
