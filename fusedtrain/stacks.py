"""Layer stacks: which nn.Linear layers, activations and loss a model and its criterion are, read
once in Python and handed to the stack ops as plain lists (a StackSpec).

A stack is a chain of nn.Linear layers (bias or not), each optionally followed by one elementwise
activation, ending in a loss. ``describe(model, criterion)`` recognises one in an nn.Linear, an
nn.Sequential, or any module whose forward torch.fx traces to such a chain, and refuses anything
else naming the first node it cannot take. The params are the model's own Parameters
(``Stack.params()``), so the optimizer, state_dict and checkpoints stay the user's. An nn.Linear
applied twice is one set of params used by two layers (their gradients add up); two distinct
modules sharing a Parameter are refused. ``prepare_target`` checks a batch against the stack and
gives the target the ops take.

The Activation and Loss codes are the ops' int arguments (defined with the reference ops, which
read them; csrc/stack_spec.h holds the same values).
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

import fusedtrain.nn
from fusedtrain.reference import MEAN, SUM, Activation, Loss

__all__ = ["Activation", "Loss", "StackSpec", "Stack", "describe", "describe_model",
           "describe_criterion", "prepare_target"]

SUPPORTED_MODELS = (
    "supported: nn.Linear layers, each optionally followed by one of ReLU, LeakyReLU, Tanh, "
    "Sigmoid, GELU, SiLU (modules, torch functions or Tensor methods; nn.Identity is skipped), "
    "in a chain from the input to the output")
SUPPORTED_CRITERIA = (
    "supported: nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.CrossEntropyLoss, "
    "nn.BCEWithLogitsLoss (or their torch.nn.functional forms with default settings), "
    "reduction 'mean' or 'sum'")


class StackSpec(NamedTuple):
    """What the stack ops take after x, target and params, in the schemas' order (written once:
    every caller splats it). Layer l has weight params[layer_params[l]] and, if has_bias[l], bias
    params[layer_params[l] + 1]; an nn.Linear applied twice gives two layers with one index."""

    has_bias: list[bool]  # per layer
    layer_params: list[int]  # per layer: the index of its weight in params
    activations: list[int]  # per layer, Activation codes (IDENTITY: none after that layer)
    activation_params: list[float]  # per layer: LeakyReLU's negative_slope, else 0.0
    loss: int  # Loss code
    reduction: int  # reference.MEAN or reference.SUM
    loss_param: float  # SmoothL1Loss's beta, HuberLoss's delta, else 0.0
    ignore_index: int  # CrossEntropyLoss's ignore_index, else -100
    label_smoothing: float  # CrossEntropyLoss's label_smoothing, else 0.0


class Stack(NamedTuple):
    """A recognised model and criterion: the model's nn.Linear modules, one per layer in order
    (a module applied twice appears twice), and the spec the ops take."""

    linears: tuple[nn.Linear, ...]
    spec: StackSpec

    def params(self) -> list[Tensor]:
        """The model's own Parameters as the ops take them: weight, then bias if any, of each
        distinct nn.Linear in the order of its first use."""
        return [p for linear in _distinct(self.linears) for p in _own_params(linear)]


def describe(model: nn.Module, criterion=None) -> Stack:
    """The stack that ``criterion(model(x), y)`` computes (criterion None: nn.MSELoss()).
    TypeError or ValueError, naming what is not supported, for anything else."""
    linears, activations, activation_params = describe_model(model)
    first_index, count = {}, 0
    for linear in _distinct(linears):
        first_index[linear] = count
        count += len(_own_params(linear))
    spec = StackSpec([linear.bias is not None for linear in linears],
                     [first_index[linear] for linear in linears], activations, activation_params,
                     *describe_criterion(criterion))
    return Stack(tuple(linears), spec)


# ---------------------------------------------------------------------------------------------
# The model


class _Step(NamedTuple):
    """One node of the chain: a layer (linear set) or an activation (code, param)."""

    name: str
    what: str
    linear: nn.Linear | None = None
    code: int = Activation.IDENTITY
    param: float = 0.0


def describe_model(model: nn.Module) -> tuple[list[nn.Linear], list[int], list[float]]:
    """The model as a stack: its nn.Linear modules, one per layer in order, and the activation
    code and param after each. TypeError naming the first node that is not part of a supported
    stack; ValueError for layers whose widths do not chain."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedtrain: the model must be an nn.Module, got {type(model).__name__}")
    for path, module in model.named_modules():
        _refuse_hooks(module, path or "model")
    if type(model) is nn.Linear:  # traced, its forward would be F.linear on its own params
        steps = [_Step("model", "torch.nn.Linear", linear=model)]
    else:
        steps = _sequential_steps(model, "")
        if steps is None:
            steps = _traced_steps(model)
    linears, names, activations, activation_params = [], [], [], []
    for step in steps:
        if step.linear is not None:
            linears.append(step.linear)
            names.append(step.name)
            activations.append(int(Activation.IDENTITY))
            activation_params.append(0.0)
        elif not linears:
            raise _unsupported(step.name, step.what, "comes before the first nn.Linear")
        elif activations[-1] != Activation.IDENTITY:
            raise _unsupported(step.name, step.what, "follows another activation")
        else:
            activations[-1] = int(step.code)
            activation_params[-1] = float(step.param)
    if not linears:
        raise TypeError(f"fusedtrain: the model has no nn.Linear layer; {SUPPORTED_MODELS}")
    _check_layers(linears, names)
    return linears, activations, activation_params


def _sequential_steps(module: nn.Module, prefix: str) -> list[_Step] | None:
    """The steps of a plain nn.Sequential of Linear, Identity, activation modules and nested plain
    nn.Sequential, read from its children, as fx would trace them (a trace costs milliseconds,
    which fit and FusedTrainStep pay at every construction); None for anything else, which the
    trace then describes or refuses."""
    if type(module) is not nn.Sequential:
        return None
    steps = []
    # _modules, not named_children(): a module placed twice (nn.Sequential(fc, act, fc)) runs
    # twice, where named_children() yields it once.
    for name, child in module._modules.items():
        path = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            inner = _sequential_steps(child, f"{path}.")
            if inner is None:
                return None
            steps += inner
        elif type(child) is nn.Linear:
            steps.append(_Step(path, "torch.nn.Linear", linear=child))
        elif type(child) is not nn.Identity:
            activation = _module_activation(child)
            if activation is None:
                return None
            steps.append(_Step(path, _class_name(type(child)), code=activation[0], param=activation[1]))
    return steps


# The chain traced for a model, per model: (its modules' identities and settings, the steps).
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _traced_steps(model: nn.Module) -> list[_Step]:
    """_chain(model), traced again only when the model's class or modules changed."""
    key = (type(model).forward, tuple((name, id(m), type(m), getattr(m, "negative_slope", None),
                                       getattr(m, "approximate", None)) for name, m in model.named_modules()))
    cached = _TRACED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    steps = _chain(model)
    _TRACED[model] = (key, steps)
    return steps


def _chain(model: nn.Module) -> list[_Step]:
    """The steps of the model's fx graph, which must be one chain from its input to its output:
    each value used once, by the next node, which takes nothing else."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # whatever stops the trace, the model is not a stack fusedtrain can see
        raise TypeError(f"fusedtrain: torch.fx cannot trace the model's forward "
                        f"({type(e).__name__}: {e}); {SUPPORTED_MODELS}") from e
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    if not inputs:
        raise TypeError(f"fusedtrain: the model's forward takes no input; {SUPPORTED_MODELS}")
    for extra in inputs[1:]:
        if extra.users:
            raise _unsupported(extra.name, "a second input of forward", "is used")
    steps, on_chain, current = [], set(inputs), inputs[0]
    while True:
        users = list(current.users)
        if len(users) != 1:
            used_by = ", ".join(f"'{_label(user)}'" for user in users) or "nothing"
            raise TypeError(f"fusedtrain: the model's value '{_label(current)}' is used by "
                            f"{used_by}; a stack uses each value once; {SUPPORTED_MODELS}")
        node = users[0]
        if node.op == "output":
            if node.args[0] is not current:
                raise TypeError("fusedtrain: the model's forward must return the last layer's "
                                f"output tensor itself, not {node.args[0]!r}; {SUPPORTED_MODELS}")
            break
        if not node.args or node.args[0] is not current or node.all_input_nodes != [current]:
            raise _unsupported(_label(node), _what(model, node),
                               "takes other values than the one before it")
        step = _step(model, node)
        if step is not None:
            steps.append(step)
        on_chain.add(node)
        current = node
    for node in graph.nodes:
        if node.op != "output" and node not in on_chain:
            raise _unsupported(_label(node), _what(model, node),
                               "is not on the chain from the input to the output")
    return steps


def _step(model: nn.Module, node: torch.fx.Node) -> _Step | None:
    """The chain step of a node (None for nn.Identity); TypeError if it is none."""
    name, what = _label(node), _what(model, node)
    activation = None
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if type(module) is nn.Identity:
            return None
        if type(module) is nn.Linear:
            return _Step(name, what, linear=module)
        activation = _module_activation(module)
    elif node.op == "call_function" and node.target in _FUNCTION_ACTIVATIONS:
        activation = _FUNCTION_ACTIVATIONS[node.target](node)
    elif node.op == "call_method" and node.target in _METHOD_ACTIVATIONS:
        activation = (_METHOD_ACTIVATIONS[node.target], 0.0)
    if activation is None:
        raise _unsupported(name, what)
    return _Step(name, what, code=activation[0], param=activation[1])


def _refuse_hooks(module: nn.Module, name: str) -> None:
    """Hooks would not run in the fused ops: refused, not dropped silently."""
    if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        raise TypeError(f"fusedtrain: the model's module '{name}' has hooks, which a fused stack "
                        "would not run; remove them to fuse the model")


def _gelu_code(approximate) -> int | None:
    return {"none": Activation.GELU, "tanh": Activation.GELU_TANH}.get(approximate)


def _module_activation(module: nn.Module) -> tuple[int, float] | None:
    """(code, param) of an activation module (exactly the torch class: a subclass may compute
    something else), or None."""
    kind = type(module)
    if kind is nn.LeakyReLU:
        return Activation.LEAKY_RELU, module.negative_slope
    if kind is nn.GELU:
        code = _gelu_code(module.approximate)
        return None if code is None else (code, 0.0)
    code = {nn.ReLU: Activation.RELU, nn.Tanh: Activation.TANH, nn.Sigmoid: Activation.SIGMOID,
            nn.SiLU: Activation.SILU}.get(kind)
    return None if code is None else (code, 0.0)


def _option(node: torch.fx.Node, position: int, name: str, default):
    """An argument of a traced call, given by position or by name."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _gelu_call(node: torch.fx.Node) -> tuple[int, float] | None:
    code = _gelu_code(_option(node, 1, "approximate", "none"))
    return None if code is None else (code, 0.0)


def _leaky_relu_call(node: torch.fx.Node) -> tuple[int, float]:
    return Activation.LEAKY_RELU, float(_option(node, 1, "negative_slope", 0.01))


# Calls as torch.fx records them (F.tanh and F.sigmoid trace as the Tensor methods; an in-place
# form counts as its activation). F.relu_ is torch.relu_.
_FUNCTION_ACTIVATIONS = {
    **dict.fromkeys((F.relu, torch.relu, torch.relu_), lambda node: (Activation.RELU, 0.0)),
    **dict.fromkeys((F.leaky_relu, F.leaky_relu_), _leaky_relu_call),
    **dict.fromkeys((torch.tanh, torch.tanh_), lambda node: (Activation.TANH, 0.0)),
    **dict.fromkeys((torch.sigmoid, torch.sigmoid_), lambda node: (Activation.SIGMOID, 0.0)),
    F.gelu: _gelu_call,
    F.silu: lambda node: (Activation.SILU, 0.0),
}
_METHOD_ACTIVATIONS = {"relu": Activation.RELU, "relu_": Activation.RELU, "tanh": Activation.TANH,
                       "tanh_": Activation.TANH, "sigmoid": Activation.SIGMOID,
                       "sigmoid_": Activation.SIGMOID}


def _label(node: torch.fx.Node) -> str:
    """A node as the user knows it: a submodule's path ('fc1', 'net.2'), else the node's name."""
    return node.target if node.op == "call_module" else node.name


def _class_name(cls: type) -> str:
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _what(model: nn.Module, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return _class_name(type(model.get_submodule(node.target)))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        if name is None:
            return repr(node.target)
        return f"{getattr(node.target, '__module__', None) or 'torch'}.{name}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "get_attr":
        return f"the attribute {node.target}"
    return node.op


def _unsupported(name: str, what: str,
                 reason: str = "is not part of a supported stack") -> TypeError:
    return TypeError(f"fusedtrain: the model's node '{name}' ({what}) {reason}; {SUPPORTED_MODELS}")


def _own_params(linear: nn.Linear) -> list[Tensor]:
    return [linear.weight] if linear.bias is None else [linear.weight, linear.bias]


def _distinct(linears) -> list[nn.Linear]:
    """Each module once, in the order of its first use."""
    return list(dict.fromkeys(linears))


def _check_layers(linears: list[nn.Linear], names: list[str]) -> None:
    """One float dtype and device for all params, widths that chain, and no Parameter shared by
    two distinct modules (the ops would update it twice)."""
    first = linears[0].weight
    owners = {}
    for linear, name in zip(linears, names):
        for p in _own_params(linear):
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"fusedtrain: the model's layer '{name}' is {p.dtype}; a stack is "
                                "float32 or float64")
            if p.dtype != first.dtype or p.device != first.device:
                raise TypeError(f"fusedtrain: the model's layers must share one dtype and device: "
                                f"'{name}' is {p.dtype} on {p.device} but '{names[0]}' is "
                                f"{first.dtype} on {first.device}")
            owner = owners.setdefault(p, (linear, name))
            if owner[0] is not linear:
                raise TypeError(f"fusedtrain: the model's layers '{owner[1]}' and '{name}' share a "
                                "Parameter; a stack's layers share params only by applying the "
                                "same nn.Linear again")
    for l in range(1, len(linears)):
        takes, gives = linears[l].weight.shape[1], linears[l - 1].weight.shape[0]
        if takes != gives:
            raise ValueError(f"fusedtrain: the model's layer '{names[l]}' takes {takes} inputs but "
                             f"the layer before it, '{names[l - 1]}', gives {gives}")


# ---------------------------------------------------------------------------------------------
# The criterion

_REDUCTIONS = {"mean": MEAN, "sum": SUM}
_DEFAULT_CE = (-100, 0.0)  # ignore_index, label_smoothing of every loss but cross entropy
# torch.nn.functional losses taken at their defaults.
_FUNCTIONAL_CRITERIA = {
    F.mse_loss: (Loss.MSE, MEAN, 0.0, *_DEFAULT_CE),
    fusedtrain.nn.functional.mse_loss: (Loss.MSE, MEAN, 0.0, *_DEFAULT_CE),
    F.l1_loss: (Loss.L1, MEAN, 0.0, *_DEFAULT_CE),
    F.smooth_l1_loss: (Loss.SMOOTH_L1, MEAN, 1.0, *_DEFAULT_CE),
    F.huber_loss: (Loss.HUBER, MEAN, 1.0, *_DEFAULT_CE),
    F.cross_entropy: (Loss.CROSS_ENTROPY, MEAN, 0.0, *_DEFAULT_CE),
    F.binary_cross_entropy_with_logits: (Loss.BCE_WITH_LOGITS, MEAN, 0.0, *_DEFAULT_CE),
}
_CRITERION_CLASSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.CrossEntropyLoss,
                      nn.BCEWithLogitsLoss)


def describe_criterion(criterion) -> tuple[int, int, float, int, float]:
    """(loss, reduction, loss_param, ignore_index, label_smoothing) of a loss module (None:
    nn.MSELoss()); TypeError for another criterion, ValueError for settings the ops do not take
    (reduction 'none', class weights, pos_weight, ...)."""
    if criterion is None:
        return (int(Loss.MSE), MEAN, 0.0, *_DEFAULT_CE)
    if not isinstance(criterion, nn.Module):
        try:
            known = _FUNCTIONAL_CRITERIA.get(criterion)
        except TypeError:  # unhashable: not one of them
            known = None
        if known is None:
            raise TypeError(f"fusedtrain: the criterion {criterion!r} is not supported; "
                            f"{SUPPORTED_CRITERIA}")
        return (int(known[0]), *known[1:])
    torch_class = next((c for c in _CRITERION_CLASSES if isinstance(criterion, c)), None)
    # A subclass is its torch class only if it computes the same (fusedtrain.nn.MSELoss does).
    if torch_class is None or (type(criterion).forward is not torch_class.forward
                               and type(criterion) is not fusedtrain.nn.MSELoss):
        raise TypeError(f"fusedtrain: the criterion {type(criterion).__name__} is not supported; "
                        f"{SUPPORTED_CRITERIA}")
    name = torch_class.__name__
    if criterion.reduction == "none":
        raise ValueError(f"fusedtrain: {name}(reduction='none') gives a loss per element, not a "
                         "scalar training loss; use 'mean' or 'sum'")
    if criterion.reduction not in _REDUCTIONS:
        raise ValueError(f"fusedtrain: {name}'s reduction {criterion.reduction!r} is not 'mean' "
                         "or 'sum'")
    reduction = _REDUCTIONS[criterion.reduction]
    if torch_class in (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss):
        for setting in ("weight", "pos_weight"):
            if getattr(criterion, setting, None) is not None:
                raise ValueError(f"fusedtrain: {name}({setting}=...) is not supported; only the "
                                 "unweighted loss is")
    if torch_class is nn.SmoothL1Loss:
        if not criterion.beta >= 0:
            raise ValueError(f"fusedtrain: SmoothL1Loss's beta must be >= 0, got {criterion.beta}")
        return (int(Loss.SMOOTH_L1), reduction, float(criterion.beta), *_DEFAULT_CE)
    if torch_class is nn.HuberLoss:
        if not criterion.delta > 0:
            raise ValueError(f"fusedtrain: HuberLoss's delta must be > 0, got {criterion.delta}")
        return (int(Loss.HUBER), reduction, float(criterion.delta), *_DEFAULT_CE)
    if torch_class is nn.CrossEntropyLoss:
        if not 0.0 <= criterion.label_smoothing <= 1.0:
            raise ValueError("fusedtrain: CrossEntropyLoss's label_smoothing must be between 0.0 "
                             f"and 1.0, got {criterion.label_smoothing}")
        return (int(Loss.CROSS_ENTROPY), reduction, 0.0, int(criterion.ignore_index),
                float(criterion.label_smoothing))
    code = {nn.MSELoss: Loss.MSE, nn.L1Loss: Loss.L1, nn.BCEWithLogitsLoss: Loss.BCE_WITH_LOGITS}
    return (int(code[torch_class]), reduction, 0.0, *_DEFAULT_CE)


# ---------------------------------------------------------------------------------------------
# The data

_REGRESSION = (Loss.MSE, Loss.L1, Loss.SMOOTH_L1, Loss.HUBER)


def prepare_target(stack: Stack, x: Tensor, y: Tensor, caller: str) -> Tensor:
    """The target the stack ops take for the batch (x, y), after checking both.

    x must be a dense (N, in) tensor of the model's dtype and device (nn.Linear also takes
    (*, in); a stack takes rows only). The target: for MSE, L1, SmoothL1 and Huber, y of the
    model's dtype, broadcast to the prediction's shape (N, out) as torch's loss would, with
    torch's warning when the shapes differ; a y that would broadcast the prediction to a larger
    shape is refused. For cross entropy, class indices (N,) (int64, or uint8 as torch takes them)
    in [0, out) or equal to ignore_index. For BCEWithLogits, y of exactly the prediction's shape,
    as torch requires. The result is contiguous; x is returned unchanged."""
    first, last = stack.linears[0].weight, stack.linears[-1].weight
    dtype, device = first.dtype, first.device
    if not isinstance(x, Tensor) or x.layout != torch.strided:
        raise TypeError(f"{caller}: x must be a dense tensor, got "
                        f"{x.layout if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != first.shape[1]:
        raise ValueError(f"{caller}: x must have shape (N, {first.shape[1]}) (a stack takes a "
                         f"batch of rows, 2-D), got {tuple(x.shape)}")
    if x.dtype != dtype or x.device != device:
        raise TypeError(f"{caller}: x is {x.dtype} on {x.device} but the model is {dtype} on "
                        f"{device}")
    if not isinstance(y, Tensor) or y.layout != torch.strided:
        raise TypeError(f"{caller}: y must be a dense tensor, got "
                        f"{y.layout if isinstance(y, Tensor) else type(y).__name__}")
    if y.device != device:
        raise TypeError(f"{caller}: y is on {y.device} but the model is on {device}")
    pred_shape = torch.Size((x.shape[0], last.shape[0]))
    loss = stack.spec.loss
    if loss == Loss.CROSS_ENTROPY:
        return _class_indices(stack.spec.ignore_index, y, pred_shape, caller)
    if y.dtype != dtype:
        raise TypeError(f"{caller}: y is {y.dtype} but the model is {dtype}; pass y.to({dtype})")
    if y.shape == pred_shape:
        return y.contiguous()
    if loss == Loss.BCE_WITH_LOGITS:
        raise ValueError(f"{caller}: y's size ({y.size()}) must be the same as the prediction's "
                         f"size ({pred_shape}), as BCEWithLogitsLoss requires")
    try:
        fits = torch.broadcast_shapes(pred_shape, y.shape) == pred_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{caller}: y of shape {tuple(y.shape)} does not broadcast to the "
                         f"prediction's shape {tuple(pred_shape)}")
    warnings.warn(  # torch's mse_loss/l1_loss/smooth_l1_loss/huber_loss warning, word for word
        f"Using a target size ({y.size()}) that is different to the input size ({pred_shape}). "
        "This will likely lead to incorrect results due to broadcasting. "
        "Please ensure they have the same size.",
        stacklevel=3,  # the line that called the caller
    )
    return y.expand(pred_shape).contiguous()


def _class_indices(ignore_index: int, y: Tensor, pred_shape: torch.Size, caller: str) -> Tensor:
    n, n_classes = pred_shape
    if y.is_floating_point():
        raise TypeError(f"{caller}: y must hold class indices (int64, shape ({n},)); class "
                        f"probabilities as targets are not supported, got {y.dtype} of shape "
                        f"{tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"{caller}: y must hold class indices as int64 (or uint8), got {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{caller}: y must hold one class index per row of x, shape ({n},), got "
                         f"{tuple(y.shape)}")
    y = y.long().contiguous()
    bad = ((y < 0) | (y >= n_classes)) & (y != ignore_index)
    if bad.any():
        raise ValueError(f"{caller}: y holds the class index {y[bad][0].item()}, outside [0, "
                         f"{n_classes}) and not ignore_index ({ignore_index})")
    return y
