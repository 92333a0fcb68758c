"""Layer stacks: fusedtrain.stacks recognising models and criteria (torch.fx), prepare_target,
and the plain-PyTorch stack ops of reference.py against autograd and the stock training loop."""

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedtrain.nn
from fusedtrain import reference, stacks
from helpers import SimpleModel
from fusedtrain.stacks import Activation, Loss

ACTIVATION_MODULES = {
    Activation.IDENTITY: lambda: nn.Identity(),
    Activation.RELU: lambda: nn.ReLU(),
    Activation.LEAKY_RELU: lambda: nn.LeakyReLU(0.07),
    Activation.TANH: lambda: nn.Tanh(),
    Activation.SIGMOID: lambda: nn.Sigmoid(),
    Activation.GELU: lambda: nn.GELU(),
    Activation.GELU_TANH: lambda: nn.GELU(approximate="tanh"),
    Activation.SILU: lambda: nn.SiLU(),
}
ACTIVATION_PARAMS = {Activation.LEAKY_RELU: 0.07}


class FunctionalModel(SimpleModel):
    """The same layers with the activations called as functions and Tensor methods."""

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x).sigmoid()


class ReusedModel(nn.Module):
    """One nn.Linear applied twice: two layers, one set of params."""

    def __init__(self, bias=True):
        super().__init__()
        self.inp = nn.Linear(6, 9)
        self.hidden = nn.Linear(9, 9, bias=bias)
        self.out = nn.Linear(9, 3)

    def forward(self, x):
        x = F.silu(self.inp(x))
        x = torch.tanh(self.hidden(x))
        x = F.leaky_relu(self.hidden(x), 0.2)
        return self.out(x)


def spec_of(model, criterion=None):
    return stacks.describe(model, criterion).spec


# ---------------------------------------------------------------------------------------------
# Recognising models


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_is_a_stack_of_depth_one(bias):
    model = nn.Linear(5, 3, bias=bias)
    stack = stacks.describe(model)
    assert stack.linears == (model,)
    assert stack.spec == stacks.StackSpec([bias], [0], [0], [0.0], Loss.MSE, reference.MEAN, 0.0,
                                          -100, 0.0)
    assert all(a is b for a, b in zip(stack.params(), model.parameters()))
    assert len(stack.params()) == (2 if bias else 1)


@pytest.mark.parametrize("code", list(Activation))
def test_a_sequential_with_each_activation(code):
    model = nn.Sequential(nn.Linear(4, 8), ACTIVATION_MODULES[code](), nn.Linear(8, 2, bias=False),
                          ACTIVATION_MODULES[code]())
    linears, activations, activation_params = stacks.describe_model(model)
    assert linears == [model[0], model[2]]
    assert activations == [code, code]
    assert activation_params == [ACTIVATION_PARAMS.get(code, 0.0)] * 2
    assert all(type(a) is int for a in activations)
    spec = spec_of(model)
    assert spec.has_bias == [True, False]
    assert spec.layer_params == [0, 2]


def test_the_tutorial_model():
    model = SimpleModel()
    stack = stacks.describe(model, nn.MSELoss())
    assert stack.linears == (model.fc1, model.fc2, model.fc3)
    assert stack.spec.activations == [Activation.RELU, Activation.RELU, Activation.IDENTITY]
    assert stack.spec.layer_params == [0, 2, 4]
    assert all(a is b for a, b in zip(stack.params(), model.parameters()))


def test_functions_and_tensor_methods_as_activations():
    assert spec_of(FunctionalModel()).activations == [Activation.RELU, Activation.TANH,
                                                      Activation.SIGMOID]

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(8))

        def forward(self, x):
            a, b, c, d, e, f, g, h = self.layers
            x = F.leaky_relu(a(x), 0.2)
            x = F.gelu(b(x), approximate="tanh")
            x = F.silu(c(x), inplace=True)
            x = torch.relu_(d(x))
            x = e(x).tanh_()
            x = F.relu(f(x), inplace=True)
            x = F.gelu(g(x))
            return torch.sigmoid(h(x))

    spec = spec_of(Calls())
    assert spec.activations == [Activation.LEAKY_RELU, Activation.GELU_TANH, Activation.SILU,
                                Activation.RELU, Activation.TANH, Activation.RELU, Activation.GELU,
                                Activation.SIGMOID]
    assert spec.activation_params == [0.2] + [0.0] * 7


def test_identity_and_nested_sequentials_are_walked_through():
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Tanh()),
                          nn.Identity(), nn.Sequential(nn.Linear(4, 2)), nn.Identity())
    linears, activations, _ = stacks.describe_model(model)
    assert linears == [model[1][0], model[3][0]]
    assert activations == [Activation.TANH, Activation.IDENTITY]


@pytest.mark.parametrize("bias", [True, False])
def test_a_module_applied_twice_is_two_layers_with_one_set_of_params(bias):
    model = ReusedModel(bias)
    stack = stacks.describe(model)
    assert stack.linears == (model.inp, model.hidden, model.hidden, model.out)
    assert stack.spec.has_bias == [True, bias, bias, True]
    hidden_end = 2 + (2 if bias else 1)
    assert stack.spec.layer_params == [0, 2, 2, hidden_end]
    params = stack.params()
    assert len(params) == hidden_end + 2
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert stack.spec.activations == [Activation.SILU, Activation.TANH, Activation.LEAKY_RELU,
                                      Activation.IDENTITY]


def test_a_module_placed_twice_in_a_sequential_is_two_layers():
    """nn.Sequential(fc, act, fc) runs fc twice (named_children() lists it once)."""
    torch.manual_seed(4)
    fc = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), fc, nn.ReLU(), fc).double()
    stack = stacks.describe(model)
    assert stack.linears == (model[0], fc, fc)
    assert stack.spec.layer_params == [0, 2, 2]
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    model.zero_grad()
    want = nn.functional.mse_loss(model(x), y)
    want.backward()
    loss, grads = reference.stack_fwd_bwd(x, y, [p.detach() for p in stack.params()], *stack.spec)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grads, [p.grad for p in stack.params()])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + x


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x), x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return x


class SecondInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale):
        return self.fc(x) * scale


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.scale


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.fc.weight.sum()  # traced, but not on the chain
        return self.fc(x)


class Relu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu6(self.fc(x))


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _hooked(where):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    module = model if where == "root" else model[int(where)]
    module.register_forward_hook(lambda module, inputs, output: output * 2)
    return model


def _dropout_in_eval():
    return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).eval()


BAD_MODELS = [
    ("dropout", lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)),
     TypeError, "node '1' (torch.nn.Dropout) is not part of a supported stack"),
    ("dropout in eval mode", _dropout_in_eval, TypeError, "node '1' (torch.nn.Dropout)"),
    ("batchnorm", lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
     TypeError, "node '1' (torch.nn.BatchNorm1d)"),
    ("two activations", lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh()),
     TypeError, "node '2' (torch.nn.Tanh) follows another activation"),
    ("activation first", lambda: nn.Sequential(nn.Tanh(), nn.Linear(3, 4)),
     TypeError, "node '0' (torch.nn.Tanh) comes before the first nn.Linear"),
    ("an unsupported activation", lambda: nn.Sequential(nn.Linear(3, 4), nn.ELU()),
     TypeError, "node '1' (torch.nn.ELU)"),
    ("an unsupported module", lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1)),
     TypeError, "node '1' (torch.nn.Softmax) is not part"),
    ("an unsupported function", Relu6, TypeError,
     "node 'relu6' (torch.nn.functional.relu6) is not part"),
    ("residual", Residual, TypeError, "value 'x' is used by 'fc', 'add'"),
    ("two outputs", TwoHeads, TypeError, "value 'x' is used by 'fc', 'output'"),
    ("control flow", Branchy, TypeError, "torch.fx cannot trace the model's forward"),
    ("a second input", SecondInput, TypeError, "node 'scale' (a second input of forward) is used"),
    ("a parameter in forward", Scaled, TypeError, "node 'mul' (_operator.mul) takes other values"),
    ("a node off the chain", Unused, TypeError, "node 'fc_weight' (the attribute fc.weight) is not on the chain"),
    ("a Linear subclass", lambda: nn.Sequential(MyLinear(3, 4)), TypeError,
     "node 'linear' (torch._C._nn.linear)"),
    ("tied weights", Tied, TypeError, "layers 'a' and 'b' share a Parameter"),
    ("a hooked layer", lambda: _hooked("0"), TypeError, "module '0' has hooks"),
    ("a hooked activation", lambda: _hooked("1"), TypeError, "module '1' has hooks"),
    ("a hooked model", lambda: _hooked("root"), TypeError, "module 'model' has hooks"),
    ("no Linear", nn.Sequential, TypeError, "has no nn.Linear layer"),
    ("only Identity", nn.Identity, TypeError, "has no nn.Linear layer"),
    ("mismatched widths", lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 1)),
     ValueError, "layer '2' takes 5 inputs but the layer before it, '0', gives 4"),
    ("mixed dtypes", lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1).double()),
     TypeError, "'1' is torch.float64 on cpu but '0' is torch.float32 on cpu"),
    ("float16", lambda: nn.Linear(3, 4).half(), TypeError, "'model' is torch.float16"),
    ("not a module", lambda: (lambda x: x), TypeError, "must be an nn.Module"),
]


@pytest.mark.parametrize("make,error,message", [case[1:] for case in BAD_MODELS],
                         ids=[case[0] for case in BAD_MODELS])
def test_unsupported_models_are_refused_naming_the_node(make, error, message):
    with pytest.raises(error) as info:
        stacks.describe_model(make())
    text = str(info.value)
    assert message in text
    # What a stack may hold is listed wherever the model's structure is refused.
    assert (stacks.SUPPORTED_MODELS in text) == ("node" in message or "no nn.Linear" in message
                                                 or "value" in message or "trace" in message)


# ---------------------------------------------------------------------------------------------
# Recognising criteria


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("criterion,expected", [
    (nn.MSELoss, (Loss.MSE, 0.0, -100, 0.0)),
    (fusedtrain.nn.MSELoss, (Loss.MSE, 0.0, -100, 0.0)),
    (nn.L1Loss, (Loss.L1, 0.0, -100, 0.0)),
    (nn.SmoothL1Loss, (Loss.SMOOTH_L1, 1.0, -100, 0.0)),
    (lambda reduction: nn.SmoothL1Loss(reduction=reduction, beta=0.25), (Loss.SMOOTH_L1, 0.25, -100, 0.0)),
    (lambda reduction: nn.SmoothL1Loss(reduction=reduction, beta=0.0), (Loss.SMOOTH_L1, 0.0, -100, 0.0)),
    (nn.HuberLoss, (Loss.HUBER, 1.0, -100, 0.0)),
    (lambda reduction: nn.HuberLoss(reduction=reduction, delta=2.5), (Loss.HUBER, 2.5, -100, 0.0)),
    (nn.CrossEntropyLoss, (Loss.CROSS_ENTROPY, 0.0, -100, 0.0)),
    (lambda reduction: nn.CrossEntropyLoss(reduction=reduction, ignore_index=3, label_smoothing=0.2),
     (Loss.CROSS_ENTROPY, 0.0, 3, 0.2)),
    (nn.BCEWithLogitsLoss, (Loss.BCE_WITH_LOGITS, 0.0, -100, 0.0)),
], ids=["mse", "fusedtrain-mse", "l1", "smooth-l1", "smooth-l1-beta", "smooth-l1-beta0", "huber",
        "huber-delta", "ce", "ce-ignore-smoothing", "bce"])
def test_criteria(criterion, expected, reduction):
    loss, loss_param, ignore_index, label_smoothing = expected
    code = reference.MEAN if reduction == "mean" else reference.SUM
    got = stacks.describe_criterion(criterion(reduction=reduction))
    assert got == (loss, code, loss_param, ignore_index, label_smoothing)
    assert [type(v) for v in got] == [int, int, float, int, float]


def test_no_criterion_and_functional_criteria_are_the_defaults():
    assert stacks.describe_criterion(None) == (Loss.MSE, reference.MEAN, 0.0, -100, 0.0)
    for fn, module in [(F.mse_loss, nn.MSELoss()), (F.l1_loss, nn.L1Loss()),
                       (F.smooth_l1_loss, nn.SmoothL1Loss()), (F.huber_loss, nn.HuberLoss()),
                       (F.cross_entropy, nn.CrossEntropyLoss()),
                       (F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss()),
                       (fusedtrain.nn.functional.mse_loss, nn.MSELoss())]:
        assert stacks.describe_criterion(fn) == stacks.describe_criterion(module)


class MyMSE(nn.MSELoss):
    def forward(self, input, target):
        return super().forward(input, target) * 2


@pytest.mark.parametrize("criterion,error,message", [
    (nn.MSELoss(reduction="none"), ValueError, "MSELoss(reduction='none') gives a loss per element"),
    (nn.CrossEntropyLoss(reduction="none"), ValueError, "reduction='none'"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), ValueError, "CrossEntropyLoss(weight=...) is not supported"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), ValueError, "BCEWithLogitsLoss(pos_weight=...)"),
    (nn.BCEWithLogitsLoss(weight=torch.ones(3)), ValueError, "BCEWithLogitsLoss(weight=...)"),
    (nn.SmoothL1Loss(beta=-1.0), ValueError, "beta must be >= 0"),
    (nn.HuberLoss(delta=0.0), ValueError, "delta must be > 0"),
    (nn.CrossEntropyLoss(label_smoothing=1.5), ValueError, "label_smoothing must be between"),
    (nn.NLLLoss(), TypeError, "criterion NLLLoss is not supported"),
    (nn.KLDivLoss(), TypeError, "criterion KLDivLoss is not supported"),
    (MyMSE(), TypeError, "criterion MyMSE is not supported"),
    (F.nll_loss, TypeError, "is not supported; supported: nn.MSELoss"),
    (lambda pred, y: (pred - y).pow(4).mean(), TypeError, "is not supported"),
    ([], TypeError, "is not supported"),
], ids=["mse-none", "ce-none", "ce-weight", "bce-pos-weight", "bce-weight", "beta<0", "delta=0",
        "label-smoothing>1", "nll", "kldiv", "subclass", "functional-nll", "lambda", "a list"])
def test_unsupported_criteria_are_refused(criterion, error, message):
    with pytest.raises(error) as info:
        stacks.describe_criterion(criterion)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# The data


def test_regression_target_broadcasts_as_torch_with_its_warning():
    stack = stacks.describe(nn.Linear(3, 2))
    x = torch.randn(5, 3)
    y = torch.randn(5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stacks.prepare_target(stack, x, y, "fit") is y
        assert stacks.prepare_target(stack, x, y.T.contiguous().T, "fit").is_contiguous()
    row = torch.randn(2)
    with pytest.warns(UserWarning) as caught:
        target = stacks.prepare_target(stack, x, row, "fit")
    with pytest.warns(UserWarning) as torch_caught:
        F.mse_loss(torch.zeros(5, 2), row)
    assert str(caught[0].message) == str(torch_caught[0].message)
    assert target.is_contiguous() and torch.equal(target, row.expand(5, 2))
    with pytest.raises(ValueError, match=r"fit: y of shape \(5,\) does not broadcast to the "
                                         r"prediction's shape \(5, 2\)"):
        stacks.prepare_target(stack, x, torch.randn(5), "fit")


def test_a_target_that_would_widen_the_prediction_is_refused():
    stack = stacks.describe(nn.Linear(3, 1))  # (N,) against (N, 1) would broadcast to (N, N)
    with pytest.raises(ValueError, match="does not broadcast"):
        stacks.prepare_target(stack, torch.randn(4, 3), torch.randn(4), "fit")


def test_class_index_targets():
    stack = stacks.describe(nn.Linear(3, 4), nn.CrossEntropyLoss(ignore_index=-1))
    x = torch.randn(5, 3)
    y = torch.tensor([0, 3, -1, 2, 1])
    assert torch.equal(stacks.prepare_target(stack, x, y, "fit"), y)
    as_bytes = stacks.prepare_target(stack, x, y.clamp(min=0).to(torch.uint8), "fit")
    assert as_bytes.dtype == torch.int64 and torch.equal(as_bytes, y.clamp(min=0))
    for bad, error, message in [
        (torch.tensor([0, 4, 1, 1, 1]), ValueError, "class index 4, outside [0, 4) and not ignore_index (-1)"),
        (torch.tensor([0, -100, 1, 1, 1]), ValueError, "class index -100"),
        (torch.rand(5, 4), TypeError, "class probabilities as targets are not supported"),
        (y.int(), TypeError, "int64 (or uint8), got torch.int32"),
        (y[:4], ValueError, "shape (5,), got (4,)"),
        (y.unsqueeze(1), ValueError, "shape (5,), got (5, 1)"),
    ]:
        with pytest.raises(error) as info:
            stacks.prepare_target(stack, x, bad, "fit")
        assert message in str(info.value) and str(info.value).startswith("fit: y ")


def test_bce_targets_must_have_the_prediction_shape_as_in_torch():
    stack = stacks.describe(nn.Linear(3, 1), nn.BCEWithLogitsLoss())
    x = torch.randn(5, 3)
    y = torch.rand(5, 1)
    assert stacks.prepare_target(stack, x, y, "fit") is y
    with pytest.raises(ValueError, match="must be the same as the prediction's size"):
        stacks.prepare_target(stack, x, torch.rand(5), "fit")
    with pytest.raises(ValueError):
        F.binary_cross_entropy_with_logits(torch.zeros(5, 1), torch.rand(5))  # torch refuses too


@pytest.mark.parametrize("x,y,error,message", [
    (torch.randn(5, 2, 3), torch.randn(5, 2), ValueError, "x must have shape (N, 3) (a stack takes a batch of rows, 2-D), got (5, 2, 3)"),
    (torch.randn(5, 4), torch.randn(5, 2), ValueError, "x must have shape (N, 3)"),
    (torch.randn(3), torch.randn(2), ValueError, "x must have shape (N, 3)"),
    (torch.randn(5, 3).double(), torch.randn(5, 2), TypeError, "x is torch.float64 on cpu but the model is torch.float32"),
    (torch.randn(5, 3).to_sparse(), torch.randn(5, 2), TypeError, "x must be a dense tensor"),
    ([[0.0] * 3], torch.randn(1, 2), TypeError, "x must be a dense tensor, got list"),
    (torch.randn(5, 3), torch.randn(5, 2).double(), TypeError, "y is torch.float64 but the model is torch.float32"),
    (torch.randn(5, 3), torch.ones(5, 2, dtype=torch.long), TypeError, "y is torch.int64"),
    (torch.randn(5, 3), torch.randn(5, 2).to_sparse(), TypeError, "y must be a dense tensor"),
    (torch.randn(5, 3), torch.randn(5, 2, device="meta"), TypeError, "y is on meta but the model is on cpu"),
], ids=["x-3d", "x-width", "x-1d", "x-dtype", "x-sparse", "x-list", "y-dtype", "y-int", "y-sparse",
        "y-device"])
def test_bad_batches_are_refused_naming_x_or_y(x, y, error, message):
    stack = stacks.describe(nn.Linear(3, 2))
    with pytest.raises(error) as info:
        stacks.prepare_target(stack, x, y, "fit")
    assert str(info.value).startswith("fit: ") and message in str(info.value)


# ---------------------------------------------------------------------------------------------
# The reference stack ops against autograd


CRITERIA = {
    "mse": lambda r: nn.MSELoss(reduction=r),
    "l1": lambda r: nn.L1Loss(reduction=r),
    "smooth_l1": lambda r: nn.SmoothL1Loss(reduction=r, beta=0.5),
    "huber": lambda r: nn.HuberLoss(reduction=r, delta=0.7),
    "cross_entropy": lambda r: nn.CrossEntropyLoss(reduction=r, ignore_index=1, label_smoothing=0.1),
    "bce_with_logits": lambda r: nn.BCEWithLogitsLoss(reduction=r),
}
WIDTHS = [1, 2, 3, 5, 8, 17, 32, 64, 100, 300]


def make_target(criterion, n, out, generator, dtype):
    if isinstance(criterion, nn.CrossEntropyLoss):
        return torch.randint(0, out, (n,), generator=generator)
    if isinstance(criterion, nn.BCEWithLogitsLoss):
        return torch.rand(n, out, generator=generator, dtype=torch.float64).to(dtype)
    return torch.randn(n, out, generator=generator, dtype=torch.float64).to(dtype)


def random_model(code, seed, last_activation):
    """A Sequential of 1-4 layers of random widths (1..300), some without bias, with `code`
    after every hidden layer (and after the last one if last_activation), in fp64."""
    rng = random.Random(seed)
    depth = rng.randint(1, 4)
    widths = [rng.choice(WIDTHS) for _ in range(depth + 1)]
    torch.manual_seed(seed)
    layers = []
    for l in range(depth):
        layers.append(nn.Linear(widths[l], widths[l + 1], bias=rng.random() < 0.7, dtype=torch.float64))
        if l < depth - 1 or last_activation:
            layers.append(ACTIVATION_MODULES[code]())
    return nn.Sequential(*layers), rng.randint(1, 40)


def reference_and_autograd(model, criterion, x, y):
    """(loss, grads) from reference.stack_fwd_bwd, and from autograd through model and criterion,
    the grads in the order of Stack.params()."""
    stack = stacks.describe(model, criterion)
    params = stack.params()
    got = reference.stack_fwd_bwd(x, y, [p.detach() for p in params], *stack.spec)
    for p in params:
        p.grad = None
    loss = criterion(model(x), y)
    loss.backward()
    return got, (loss.detach(), [p.grad for p in params])


def rel_err(got, want):
    want = want.double()
    return float((got.double() - want).norm() / max(float(want.norm()), 1e-300))


def assert_matches(got, want, tol):
    loss, grads = got
    want_loss, want_grads = want
    assert loss.dtype == want_loss.dtype and loss.shape == ()
    assert rel_err(loss, want_loss) <= tol, (float(loss), float(want_loss))
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) <= tol


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(CRITERIA))
@pytest.mark.parametrize("code", list(Activation), ids=[a.name for a in Activation])
def test_stack_fwd_bwd_matches_autograd(code, loss_name, reduction):
    seed = 1000 * int(code) + 10 * list(CRITERIA).index(loss_name) + (reduction == "sum")
    model64, n = random_model(code, seed, last_activation=seed % 3 == 0)
    criterion = CRITERIA[loss_name](reduction)
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, model64[0].in_features, generator=g, dtype=torch.float64)
    out = [m for m in model64 if isinstance(m, nn.Linear)][-1].out_features
    y64 = make_target(criterion, n, out, g, torch.float64)

    # fp64: the same math as autograd's, to rounding.
    got, truth = reference_and_autograd(model64, criterion, x64, y64)
    assert_matches(got, truth, 1e-10)

    # fp32: no further from the fp64 truth than 4x the stock fp32 loop (or 1e-5).
    model32 = copy.deepcopy(model64).float()
    x32, y32 = x64.float(), (y64 if loss_name == "cross_entropy" else y64.float())
    (loss, grads), (stock_loss, stock_grads) = reference_and_autograd(model32, criterion, x32, y32)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert rel_err(loss, truth[0]) <= max(1e-5, 4 * rel_err(stock_loss, truth[0]))
    for got, stock, want in zip(grads, stock_grads, truth[1]):
        assert rel_err(got, want) <= max(1e-5, 4 * rel_err(stock, want))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_a_module_applied_twice_sums_its_gradients(bias, dtype, tol):
    torch.manual_seed(0)
    model = ReusedModel(bias).to(dtype)
    criterion = nn.CrossEntropyLoss()
    x = torch.randn(11, 6, dtype=dtype)
    y = torch.randint(0, 3, (11,))
    assert_matches(*reference_and_autograd(model, criterion, x, y), tol)


@pytest.mark.parametrize("model", [SimpleModel, FunctionalModel], ids=["modules", "functions"])
def test_the_tutorial_models_match_autograd(model):
    torch.manual_seed(1)
    model = model().double()
    x, y = torch.randn(64, 10, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    assert_matches(*reference_and_autograd(model, nn.MSELoss(), x, y), 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index,label_smoothing", [(-100, 0.0), (-100, 0.3), (2, 0.0), (0, 1.0)])
def test_cross_entropy_ignore_index_and_label_smoothing(ignore_index, label_smoothing, reduction):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5)).double()
    criterion = nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                    reduction=reduction)
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (20,))
    y[::3] = ignore_index
    assert_matches(*reference_and_autograd(model, criterion, x, y), 1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_with_every_row_ignored(reduction):
    model = nn.Linear(3, 4).double()
    criterion = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.2)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.full((6,), -100)
    (loss, grads), (want_loss, want_grads) = reference_and_autograd(model, criterion, x, y)
    assert want_loss.isnan() if reduction == "mean" else want_loss == 0  # torch's convention
    torch.testing.assert_close(loss, want_loss, equal_nan=True)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want) and not want.any()


@pytest.mark.parametrize("loss_name", list(CRITERIA))
def test_an_empty_batch_is_a_nan_mean_and_zero_gradients_as_torch(loss_name):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    criterion = CRITERIA[loss_name]("mean")
    x = torch.randn(0, 3, dtype=torch.float64)
    y = make_target(criterion, 0, 2, torch.Generator(), torch.float64)
    (loss, grads), (want_loss, want_grads) = reference_and_autograd(model, criterion, x, y)
    assert want_loss.isnan() and loss.isnan()
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


def identity_layer(k):
    """A Linear(k, k) that returns its input exactly: the prediction is x, bit for bit."""
    layer = nn.Linear(k, k).double()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(k))
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("criterion", [
    nn.L1Loss, lambda reduction: nn.SmoothL1Loss(reduction=reduction, beta=0.5),
    lambda reduction: nn.SmoothL1Loss(reduction=reduction, beta=0.0),
    lambda reduction: nn.HuberLoss(reduction=reduction, delta=0.5), nn.MSELoss,
], ids=["l1", "smooth-l1", "smooth-l1-beta0", "huber", "mse"])
def test_loss_kinks_at_the_boundary_points_follow_torch(criterion, reduction):
    # r = pred - target exactly 0, +-beta (= +-delta), and either side of them.
    criterion = criterion(reduction=reduction)
    model = identity_layer(4)
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, -0.5, 0.25, -0.75], [1.0, 2.0, -3.0, 0.5]],
                     dtype=torch.float64)
    y = torch.tensor([[0.0, -0.5, 0.5, -0.25], [0.0, 0.0, 0.0, 0.0], [1.0, 1.5, -2.5, 1.0]],
                     dtype=torch.float64)
    got, want = reference_and_autograd(model, criterion, x, y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-15, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-15, atol=1e-300)


@pytest.mark.parametrize("code", list(Activation), ids=[a.name for a in Activation])
def test_activation_derivatives_at_zero_follow_torch(code):
    model = nn.Sequential(identity_layer(3), ACTIVATION_MODULES[code](), nn.Linear(3, 2).double())
    x = torch.tensor([[0.0, 1.0, -2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got, want = reference_and_autograd(model, nn.MSELoss(), x, y)
    assert_matches(got, want, 1e-14)


@pytest.mark.parametrize("logits", [[0.0, 0.0], [40.0, -40.0], [-800.0, 800.0]])
def test_bce_with_logits_at_zero_and_far_out(logits):
    model = identity_layer(2)
    x = torch.tensor([logits, [0.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    got, want = reference_and_autograd(model, nn.BCEWithLogitsLoss(), x, y)
    assert got[0].isfinite()
    assert_matches(got, want, 1e-14)


def test_without_gradients_only_the_loss():
    torch.manual_seed(4)
    model = SimpleModel()
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    stack = stacks.describe(model)
    params = [p.detach() for p in stack.params()]
    loss, grads = reference.stack_fwd_bwd(x, y, params, *stack.spec, need_grads=False)
    assert grads == []
    assert torch.equal(loss, reference.stack_fwd_bwd(x, y, params, *stack.spec)[0])


def test_the_reference_records_no_autograd_graph():
    model = SimpleModel()
    stack = stacks.describe(model)
    loss, grads = reference.stack_fwd_bwd(torch.randn(4, 10), torch.randn(4, 1), stack.params(),
                                          *stack.spec)
    assert not loss.requires_grad and not any(g.requires_grad for g in grads)


@pytest.mark.parametrize("change,message", [
    (dict(activations=[0]), "activations has 1 entries for 2 layers"),
    (dict(layer_params=[0, 5]), "layer_params holds 5, outside the 4 params"),
    (dict(layer_params=[0, 1]), "layer_params gives params[1] two roles"),
    (dict(layer_params=[0, 0]), "the layers use 2 of the 4 params"),
    (dict(activations=[0, 9]), "activations holds 9, not an Activation code"),
    (dict(loss=6), "loss is 6, not a Loss code"),
    (dict(reduction=0), "reduction must be 1 (mean) or 2 (sum), got 0"),
])
def test_the_reference_refuses_a_spec_that_does_not_fit(change, message):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    stack = stacks.describe(model)
    spec = stack.spec._replace(**change)
    with pytest.raises(ValueError) as info:
        reference.stack_fwd_bwd(torch.randn(2, 3), torch.randn(2, 2), stack.params(), *spec)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# The reference train steps against the stock loop


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, foreach=False),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                                 weight_decay=0.01, foreach=False),
    "sgd-dampening-maximize": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.5, dampening=0.3,
                                                        maximize=True, foreach=False),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=False),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, weight_decay=0.01,
                                                  foreach=False),
    "adam-maximize": lambda p: torch.optim.Adam(p, lr=0.001, betas=(0.8, 0.99), maximize=True,
                                                foreach=False),
}
STEP_MODELS = {
    "mlp-mse": (lambda: nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8, bias=False),
                                      nn.ReLU(), nn.Linear(8, 3)), nn.MSELoss()),
    "reused-ce": (lambda: ReusedModel(), nn.CrossEntropyLoss(label_smoothing=0.1)),
}


def fused_step(optimizer, stack, x, target, params, state, first):
    """One reference stack step with the optimizer's settings; `state` holds its state lists."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is one
        beta1, beta2 = group["betas"]
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        return reference.stack_adam_step_(
            x, target, params, *stack.spec, *state, group["lr"], beta1, beta2, group["eps"],
            group["weight_decay"], decoupled, group["amsgrad"], group["maximize"])
    return reference.stack_sgd_step_(
        x, target, params, *stack.spec, *state, group["lr"], group["momentum"], group["dampening"],
        group["weight_decay"], group["nesterov"], group["maximize"], first)


@pytest.mark.parametrize("model_name", list(STEP_MODELS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_train_steps_match_the_stock_loop(opt_name, model_name):
    make_model, criterion = STEP_MODELS[model_name]
    torch.manual_seed(5)
    stock = make_model().double()
    fused = copy.deepcopy(stock)
    stock_opt = OPTIMIZERS[opt_name](stock.parameters())
    opt = OPTIMIZERS[opt_name](fused.parameters())  # read for its settings only
    stack = stacks.describe(fused, criterion)
    params = [p.detach() for p in stack.params()]
    if isinstance(opt, torch.optim.Adam):
        zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
        state = (zeros(), zeros(), zeros() if opt.param_groups[0]["amsgrad"] else [],
                 [torch.tensor(0.0) for _ in params])
    else:
        state = ([torch.empty_like(p) for p in params] if opt.param_groups[0]["momentum"] else [],)
    g = torch.Generator().manual_seed(6)
    in_features, out = stack.linears[0].in_features, stack.linears[-1].out_features
    stock_params = stacks.describe(stock).params()
    for step in range(6):
        x = torch.randn(16, in_features, generator=g, dtype=torch.float64)
        y = make_target(criterion, 16, out, g, torch.float64)
        stock_opt.zero_grad()
        want = criterion(stock(x), y)
        want.backward()
        stock_opt.step()
        loss = fused_step(opt, stack, x, y, params, state, first=step == 0)
        torch.testing.assert_close(loss, want.detach())
        for got, expected in zip(stack.params(), stock_params):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_tensor_lr_replaces_lr():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    for m, lr, lr_tensor in [(model, 0.1, None), (twin, 123.0, torch.tensor(0.1, dtype=torch.float64))]:
        stack = stacks.describe(m)
        params = [p.detach() for p in stack.params()]
        reference.stack_sgd_step_(x, y, params, *stack.spec, [], lr, 0.0, 0.0, 0.0, False, False,
                                  True, lr_tensor=lr_tensor)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
