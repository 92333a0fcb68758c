"""The Triton layer-stack ops (fusedtrain.triton.stack_fwd_bwd, stack_adam_step_,
stack_sgd_step_) against fusedtrain.reference in fp64 and the native CPU ops
(torch.ops.fusedtrain.stack_*) on the same inputs, and fit / FusedTrainStep with
backend="triton" against backend="native": on CPU tensors under the Triton interpreter, and
compiled on CUDA tensors where a GPU is present (the native results then come from CPU copies).

TRITON_INTERPRET=1 must be set before triton is imported, so each test runs this file as a
script in a fresh process (see tests/helpers.py run_triton_checks). The interpreter is slow:
the shapes are tiny and the cases few.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import NamedTuple

import pytest
import torch

import fusedtrain
from fusedtrain.reference import MEAN, SUM, Activation, Loss
from helpers import run_triton_checks

pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(),
                                reason="native extension not built: it is an oracle")


def _run_checks(*args: str, device: str = "cpu") -> None:
    run_triton_checks(__file__, *args, device=device)


def test_forward_backward_matches_reference_and_native_op():
    _run_checks("fwd_bwd")


def test_train_steps_match_native_ops_and_depth_1_mse_runs_the_linear_kernels():
    _run_checks("steps", "depth_1")


def test_refused_calls_raise_as_the_native_ops_and_change_nothing():
    _run_checks("refused")


def test_fit_and_fused_train_step_with_triton_backend_match_native():
    _run_checks("backend")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernels_on_cuda_match_native():
    _run_checks("fwd_bwd", "steps", "depth_1", "refused", "backend", "no_sync", device="cuda")


# ---- The checks, run in the subprocess ------------------------------------------------------

A = Activation


class Case(NamedTuple):
    """A stack and its loss: `layers` the distinct nn.Linear layers (in, out, has_bias), `uses`
    the order in which they are applied (a layer used twice shares its params), an activation
    per use."""

    label: str
    dtype: torch.dtype
    layers: tuple[tuple[int, int, bool], ...]
    uses: tuple[int, ...]
    activations: tuple[int, ...]
    loss: int = Loss.MSE
    reduction: int = MEAN
    loss_param: float = 0.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    rows: int = 6


# The relative error (2-norm) of the loss and of each gradient allowed against the fp64
# reference on the same input values; for fp32 at least 4x the error of the fp32 reference and of
# the native op (which round differently) on them.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
F32, F64 = torch.float32, torch.float64
# Every activation (depth 2, with and without bias), every loss under both reductions (depth 3,
# mixed activations), a reused layer, depth 1 with and without the linear kernels, ignored rows.
FWD_BWD_CASES = [
    *(Case(f"{act.name} depth 2", F32 if k % 2 else F64, ((3, 5, k % 3 != 0), (5, 2, True)),
           (0, 1), (act, act)) for k, act in enumerate(Activation)),
    *(Case(f"{loss.name} {'mean' if reduction == MEAN else 'sum'} depth 3",
           F64 if reduction == MEAN else F32, ((4, 5, True), (5, 3, False), (3, 3, True)),
           (0, 1, 2), (A.TANH, A.GELU_TANH, A.IDENTITY), loss, reduction,
           {Loss.SMOOTH_L1: 0.5, Loss.HUBER: 0.8}.get(loss, 0.0))
      for loss in Loss for reduction in (MEAN, SUM)),
    Case("SmoothL1 beta 0 (L1) depth 1", F32, ((3, 2, True),), (0,), (A.RELU,), Loss.SMOOTH_L1),
    Case("cross entropy ignore_index 2 label_smoothing 0.3, sigmoid before it", F64,
         ((3, 4, True), (4, 4, True)), (0, 1), (A.SILU, A.SIGMOID), Loss.CROSS_ENTROPY,
         ignore_index=2, label_smoothing=0.3),
    Case("cross entropy, every row ignored", F32, ((3, 4, True),), (0,), (A.IDENTITY,),
         Loss.CROSS_ENTROPY, ignore_index=0, rows=3),
    Case("reused layer", F32, ((3, 4, True), (4, 4, True), (4, 2, False)), (0, 1, 1, 2),
         (A.LEAKY_RELU, A.GELU, A.RELU, A.IDENTITY), Loss.HUBER, SUM, 1.0),
    Case("reused layer", F64, ((3, 4, False), (4, 4, True), (4, 2, True)), (0, 1, 1, 2),
         (A.SILU, A.TANH, A.SIGMOID, A.IDENTITY), Loss.MSE),
    Case("depth 1 MSE (linear kernels)", F32, ((3, 2, True),), (0,), (A.IDENTITY,)),
    Case("depth 1 MSE (linear kernels)", F64, ((3, 2, False),), (0,), (A.IDENTITY,), reduction=SUM),
    Case("empty batch", F32, ((3, 4, True), (4, 2, True)), (0, 1), (A.RELU, A.IDENTITY), rows=0),
]


def _layer_params(case: Case) -> list[int]:
    first, offsets = 0, []
    for _, _, bias in case.layers:
        offsets.append(first)
        first += 2 if bias else 1
    return [offsets[u] for u in case.uses]


def _spec(case: Case) -> tuple:
    """The stack ops' arguments after params (fusedtrain.stacks.StackSpec)."""
    return ([case.layers[u][2] for u in case.uses], _layer_params(case),
            [int(a) for a in case.activations],
            [0.2 if a == A.LEAKY_RELU else 0.0 for a in case.activations], int(case.loss),
            case.reduction, case.loss_param, case.ignore_index, case.label_smoothing)


def _problem(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """x, target and params of `case` on the CPU, drawn in fp64 and rounded to its dtype."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype)

    n = case.rows
    params = []
    for n_in, n_out, bias in case.layers:
        params += [draw(n_out, n_in)] + ([draw(n_out)] if bias else [])
    n_out = case.layers[case.uses[-1]][1]
    if case.loss == Loss.CROSS_ENTROPY:
        target = torch.randint(0, n_out, (n,), generator=g)
        target[::3] = case.ignore_index  # some rows ignored
        if case.ignore_index == 0:  # every row
            target[:] = 0
    elif case.loss == Loss.BCE_WITH_LOGITS:
        target = torch.rand(n, n_out, generator=g, dtype=torch.float64).to(case.dtype)
    else:
        target = draw(n, n_out)
    return draw(n, case.layers[case.uses[0]][0]), target, params


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if want.isnan().any():
        return 0.0 if torch.equal(got.isnan(), want.isnan()) else float("inf")
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def _errors(results, want) -> float:
    """The largest relative error of (loss, grads) against the wanted (loss, grads)."""
    (loss, grads), (want_loss, want_grads) = results, want
    assert len(grads) == len(want_grads)
    return max([_relative_error(loss, want_loss)]
               + [_relative_error(a, b) for a, b in zip(grads, want_grads)])


def _to(device, tensors):
    """Copies on `device` (on the CPU too: the ops update them in place)."""
    return [t.to(device, copy=True) for t in tensors]


def _check_fwd_bwd(device: str) -> None:
    """Loss and gradients against the fp64 reference and the native op; the loss alone
    (need_grads=False) equal to the loss with gradients."""
    from fusedtrain import reference
    from fusedtrain.triton import stack_fwd_bwd

    for seed, case in enumerate(FWD_BWD_CASES):
        x, target, params = _problem(case, seed)
        spec = _spec(case)
        label = f"{case.label} {case.dtype}"
        exact = reference.stack_fwd_bwd(x.double(), target if case.loss == Loss.CROSS_ENTROPY
                                        else target.double(), [p.double() for p in params], *spec)
        native = torch.ops.fusedtrain.stack_fwd_bwd(x, target, params, *spec)
        rounded = reference.stack_fwd_bwd(x, target, params, *spec)
        x_in = x.to(device)
        if seed % 3 == 1:  # column-major: the kernels read x by its strides
            x_in = x_in.t().contiguous().t()
        got = stack_fwd_bwd(x_in, target.to(device), _to(device, params), *spec)
        assert got[0].shape == () and got[0].dtype == case.dtype, label
        assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(got[1], params)), label
        bound = max(TOLERANCE[case.dtype], 4 * _errors(rounded, exact),
                    4 * _errors(native, exact))
        error, from_native = _errors(got, exact), _errors(got, native)
        assert error <= bound and from_native <= bound, \
            (f"{label}: relative error {error:.3g}, from the native op {from_native:.3g}, "
             f"bound {bound:.3g}")
        if seed % 4 == 0:  # (a few cases: the interpreter is slow)
            loss_only, no_grads = stack_fwd_bwd(x_in, target.to(device), _to(device, params),
                                                *spec, False)
            assert no_grads == [] and _relative_error(loss_only, got[0]) == 0.0, label
        print(f"{label}: error {error:.2g} (bound {bound:.2g})")


# The optimizer arguments after the state lists (schemas of stack_adam_step_ / stack_sgd_step_).
ADAM = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
            amsgrad=False, maximize=False)
SGD = dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
           maximize=False)
UPDATES = {
    "adam": ADAM,
    "adam amsgrad decay maximize": dict(ADAM, amsgrad=True, weight_decay=0.05, maximize=True),
    "adamw": dict(ADAM, decoupled=True, weight_decay=0.1),
    "sgd": SGD,
    "sgd momentum dampening": dict(SGD, momentum=0.9, dampening=0.3),
    "sgd nesterov decay": dict(SGD, momentum=0.9, nesterov=True, weight_decay=0.01),
}
# (stack, the updates it takes): every update on a ReLU MLP, two more in fp64.
STEP_CASES = [
    (Case("ReLU MLP, MSE", F32, ((3, 5, True), (5, 4, True), (4, 2, True)), (0, 1, 2),
          (A.RELU, A.RELU, A.IDENTITY)), list(UPDATES)),
    (Case("reused Tanh layer, cross entropy", F64, ((3, 4, True), (4, 4, False), (4, 3, True)),
          (0, 1, 1, 2), (A.TANH, A.TANH, A.IDENTITY, A.IDENTITY), Loss.CROSS_ENTROPY,
          label_smoothing=0.1), ["adam amsgrad decay maximize", "sgd nesterov decay"]),
]
# Closeness to the native op after two steps (they sum in different orders; Adam divides by
# square roots of small second moments).
STEP_TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5),
                  torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _state(name: str, params: list[torch.Tensor]) -> list:
    """Fresh state lists of the update `name`, as the op takes them after the spec."""
    zeros = [torch.zeros_like(p) for p in params]
    if name.startswith("adam"):
        return [zeros, [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params] if UPDATES[name]["amsgrad"] else [],
                [torch.tensor(0.0, dtype=p.dtype) for p in params]]
    return [zeros if UPDATES[name]["momentum"] != 0 else []]


def _check_steps(device: str) -> None:
    """Two steps of each update on each stack (SGD's first starts the momentum buffers): each
    loss, then params and every state tensor against the native op on CPU copies; the second
    call with lr given as lr_tensor."""
    import fusedtrain.triton as ft

    for seed, (case, name) in enumerate((c, n) for c, names in STEP_CASES for n in names):
        x, target, want_params = _problem(case, seed)
        spec = _spec(case)
        want_state = _state(name, want_params)
        params, state = _to(device, want_params), [_to(device, s) for s in want_state]
        adam = name.startswith("adam")
        ours, native = ((ft.stack_adam_step_, torch.ops.fusedtrain.stack_adam_step_) if adam
                        else (ft.stack_sgd_step_, torch.ops.fusedtrain.stack_sgd_step_))
        hyper = list(UPDATES[name].values())
        label = f"{case.label} {case.dtype} {name}"
        for step in range(2):
            first = [] if adam else [step == 0]
            lr_tensor = torch.tensor(hyper[0], dtype=torch.float64) if step == 1 else None
            got = ours(x.to(device), target.to(device), params, *spec, *state, *hyper, *first,
                       lr_tensor=lr_tensor)
            want = native(x, target, want_params, *spec, *want_state, *hyper, *first)
            assert got.shape == () and got.dtype == case.dtype, label
            torch.testing.assert_close(got.cpu(), want, **STEP_TOLERANCE[case.dtype],
                                       msg=lambda m: f"{label} step {step}: {m}")
        for got_t, want_t in zip(params + [t for s in state for t in s],
                                 want_params + [t for s in want_state for t in s]):
            torch.testing.assert_close(got_t.cpu(), want_t, **STEP_TOLERANCE[case.dtype],
                                       msg=lambda m: f"{label}: {m}")
        print(f"{label}: ok")


def _check_depth_1(device: str) -> None:
    """Depth 1 without activation under MSE runs linear_mse_fwd_bwd's kernels (and nothing else
    does), with the results of the native op."""
    import fusedtrain.triton as ft
    from fusedtrain.triton import linear_mse, stacks

    calls = []
    linear = linear_mse.linear_mse_fwd_bwd
    stacks.linear_mse.linear_mse_fwd_bwd = lambda *args: calls.append(args) or linear(*args)
    try:
        for seed, (activation, loss) in enumerate([(A.IDENTITY, Loss.MSE), (A.RELU, Loss.MSE),
                                                   (A.IDENTITY, Loss.L1)]):
            case = Case("depth 1", F32, ((4, 3, True),), (0,), (activation,), loss)
            x, target, want_params = _problem(case, seed)
            params = _to(device, want_params)
            got = ft.stack_sgd_step_(x.to(device), target.to(device), params, *_spec(case), [],
                                     *SGD.values(), False)
            want = torch.ops.fusedtrain.stack_sgd_step_(x, target, want_params, *_spec(case), [],
                                                        *SGD.values(), False)
            torch.testing.assert_close(got.cpu(), want, **STEP_TOLERANCE[F32])
            for a, b in zip(params, want_params):
                torch.testing.assert_close(a.cpu(), b, **STEP_TOLERANCE[F32])
            linear_kernels = activation == A.IDENTITY and loss == Loss.MSE
            assert len(calls) == linear_kernels, \
                f"{activation.name} {loss.name}: {len(calls)} calls"
            calls.clear()
    finally:
        stacks.linear_mse.linear_mse_fwd_bwd = linear
    print("depth 1: ok")


def _refused_cases(x, target, params, spec, device):
    """(label, error, message pattern, op, arguments after x and target): each call is refused by
    the Triton op and the native op alike."""
    bias, layer_params, activations, slopes, loss, reduction, loss_param, ignore, smoothing = spec
    adam_state = _state("adam", params)
    sgd_momentum = dict(SGD, momentum=0.9)

    def with_spec(**changes):
        fields = dict(zip(("has_bias", "layer_params", "activations", "activation_params", "loss",
                           "reduction", "loss_param", "ignore_index", "label_smoothing"), spec))
        fields.update(changes)
        return tuple(fields.values())

    def replaced(i, t):
        return params[:i] + [t] + params[i + 1:]

    fwd = [
        ("unknown activation", ValueError, r"activations\[1\] must be an Activation code",
         (params, *with_spec(activations=[1, 9]))),
        ("unknown loss", ValueError, "loss must be a Loss code", (params, *with_spec(loss=6))),
        ("reduction none", ValueError, "reduction must be", (params, *with_spec(reduction=0))),
        ("Huber delta 0", ValueError, "HuberLoss needs delta > 0",
         (params, *with_spec(loss=int(Loss.HUBER), loss_param=0.0))),
        ("label smoothing", ValueError, r"label_smoothing must be in \[0, 1\]",
         (params, *with_spec(label_smoothing=1.5))),
        ("short spec", ValueError, "one entry per layer", (params, *with_spec(has_bias=[True]))),
        ("layer outside params", ValueError, r"layer_params\[1\] = 3 is outside",
         (params, *with_spec(layer_params=[0, 3]))),
        ("param unused", ValueError, r"params\[3\] is used by no layer",
         (params + [params[0]], *spec)),
        ("weight dtype", TypeError, r"params\[2\] \(layer 1's weight\) has dtype",
         (replaced(2, params[2].double()), *spec)),
        ("weight shape", ValueError, r"params\[2\] \(layer 1's weight\) must have shape",
         (replaced(2, params[2][:, :3]), *spec)),
        ("bias shape", ValueError, r"params\[1\] \(layer 0's bias\) must have shape",
         (replaced(1, params[1][:2]), *spec)),
        ("weight strided", ValueError, r"params\[0\] must be a dense contiguous tensor",
         (replaced(0, params[0].t().contiguous().t()), *spec)),
    ]
    cases = [(label, error, pattern, "stack_fwd_bwd", (x, target, *args))
             for label, error, pattern, args in fwd]
    cases += [
        ("x 1-D", ValueError, "x must be 2-D", "stack_fwd_bwd", (x[0], target, params, *spec)),
        ("x int", TypeError, "x must be float32 or float64", "stack_fwd_bwd",
         (x.int(), target, params, *spec)),
        ("target shape", ValueError, r"target must have shape \(5, 2\)", "stack_fwd_bwd",
         (x, target[:, :1], params, *spec)),
        ("target dtype", TypeError, "target has dtype", "stack_fwd_bwd",
         (x, target.double(), params, *spec)),
        ("cross entropy float target", TypeError, "target must be int64", "stack_fwd_bwd",
         (x, target[:, 0], params, *with_spec(loss=int(Loss.CROSS_ENTROPY)))),
        ("exp_avgs short", ValueError, "exp_avgs has 2 tensors, expected 3", "stack_adam_step_",
         (x, target, params, *spec, adam_state[0][:2], *adam_state[1:], *ADAM.values())),
        ("exp_avg_sqs shape", ValueError, r"exp_avg_sqs\[1\] has shape", "stack_adam_step_",
         (x, target, params, *spec, adam_state[0], [adam_state[1][0]] * 3, *adam_state[2:],
          *ADAM.values())),
        ("max_exp_avg_sqs without amsgrad", ValueError, "max_exp_avg_sqs has 3 tensors, expected 0",
         "stack_adam_step_",
         (x, target, params, *spec, *adam_state[:2], adam_state[0], adam_state[3], *ADAM.values())),
        ("step of two elements", ValueError, r"steps\[2\] must have one element",
         "stack_adam_step_",
         (x, target, params, *spec, *adam_state[:3],
          adam_state[3][:2] + [torch.zeros(2, device=device)], *ADAM.values())),
        ("integer step", TypeError, r"steps\[0\] must be float32 or float64", "stack_adam_step_",
         (x, target, params, *spec, *adam_state[:3],
          [torch.tensor(0, device=device)] + adam_state[3][1:], *ADAM.values())),
        ("momentum buffers missing", ValueError, "momentum_buffers has 0 tensors, expected 3",
         "stack_sgd_step_", (x, target, params, *spec, [], *sgd_momentum.values(), False)),
        ("momentum buffer dtype", TypeError, r"momentum_buffers\[2\] has dtype", "stack_sgd_step_",
         (x, target, params, *spec, params[:2] + [params[2].double()], *sgd_momentum.values(),
          False)),
    ]
    if device == "cpu":  # on CUDA the classes are not checked (it would wait for the device)
        classes = torch.tensor([0, 1, 7, 1, 0], device=device)
        cases.append(("class out of range", IndexError, "Target 7 is out of bounds",
                      "stack_fwd_bwd",
                      (x, classes, params, *with_spec(loss=int(Loss.CROSS_ENTROPY)))))
    return cases


def _check_refused(device: str) -> None:
    """Each bad call: the Triton op raises the native op's exception type with a message naming
    the argument, and params and state are as they were."""
    import fusedtrain.triton as ft

    case = Case("refused", F32, ((3, 4, True), (4, 2, False)), (0, 1), (A.RELU, A.IDENTITY),
                rows=5)
    x, target, params = _problem(case, 0)
    for label, error, pattern, name, args in _refused_cases(x, target, params, _spec(case), "cpu"):
        with pytest.raises(error, match=pattern):
            getattr(torch.ops.fusedtrain, name)(*args)
    x, target, params = x.to(device), target.to(device), _to(device, params)
    for label, error, pattern, name, args in _refused_cases(x, target, params, _spec(case), device):
        tensors = [t for a in args for t in (a if isinstance(a, list) else [a])
                   if isinstance(t, torch.Tensor)]
        before = [t.clone() for t in tensors]
        with pytest.raises(error, match=pattern):
            getattr(ft, name)(*args)
        assert all(torch.equal(a, b) for a, b in zip(before, tensors)), f"{label}: a tensor changed"
        print(f"{label}: refused")


def _check_backend(device: str) -> None:
    """fit (shuffled batches, a last partial batch, validation) and FusedTrainStep with
    backend="triton" against backend="native" on CPU copies: losses, params, optimizer state;
    for one nn.Linear under MSE and a Tanh MLP under cross entropy."""
    g = torch.Generator().manual_seed(0)
    x, val_x = torch.randn(13, 4, generator=g), torch.randn(5, 4, generator=g)
    optimizers = [
        ("Adam", {"lr": 0.05}),
        ("AdamW", {"lr": 0.05, "amsgrad": True}),
        ("SGD", {"lr": 0.05}),
        ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ]
    problems = [  # (model, criterion, y, validation y, optimizers)
        (lambda: torch.nn.Linear(4, 2), torch.nn.MSELoss(),
         torch.randn(13, 2, generator=g), torch.randn(5, 2, generator=g), optimizers),
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)),
         torch.nn.CrossEntropyLoss(label_smoothing=0.1),
         torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (5,), generator=g),
         optimizers[1::2]),
    ]
    for make_model, criterion, y, val_y, chosen in problems:
        for name, kwargs in chosen:
            torch.manual_seed(1)
            native_model = make_model()
            native_opt = getattr(fusedtrain.optim, name)(native_model.parameters(), **kwargs)
            triton_model = copy.deepcopy(native_model).to(device)
            triton_opt = getattr(torch.optim, name)(triton_model.parameters(), **kwargs)
            for label, train in [
                ("fit", lambda model, opt, backend, on: fusedtrain.fit(
                    model, opt, x.to(on), y.to(on), epochs=2, batch_size=8, shuffle=True,
                    generator=torch.Generator().manual_seed(3), criterion=criterion,
                    val=(val_x.to(on), val_y.to(on)), backend=backend)),
                ("FusedTrainStep", lambda model, opt, backend, on: [
                    fusedtrain.FusedTrainStep(model, opt, criterion, backend=backend)(
                        x.to(on), y.to(on)) for _ in range(3)]),
            ]:
                want = train(native_model, native_opt, "native", "cpu")
                got = train(triton_model, triton_opt, "triton", device)
                where = f"{type(criterion).__name__} {name} {kwargs} {label}"
                for a, b in zip(list(got), list(want)):  # fit: train and val losses; steps: losses
                    torch.testing.assert_close(a.cpu(), b, msg=lambda m: f"{where}: {m}")
                for a, b in zip(triton_model.parameters(), native_model.parameters()):
                    torch.testing.assert_close(a.detach().cpu(), b.detach(),
                                               msg=lambda m: f"{where}: {m}")
                got_state = triton_opt.state_dict()["state"]
                for index, entries in native_opt.state_dict()["state"].items():
                    assert got_state[index].keys() == entries.keys(), where
                    for key, value in entries.items():
                        torch.testing.assert_close(got_state[index][key].cpu(), value,
                                                   msg=lambda m: f"{where} state {key}: {m}")
                print(f"{where}: ok")


def _check_no_sync(device: str) -> None:
    """On CUDA, a train step of each optimizer never waits for the device (torch's sync debug
    mode turns any synchronization into an error): the loss and the step counts stay there."""
    import fusedtrain.triton as ft

    case = STEP_CASES[1][0]._replace(dtype=F32)
    x, target, params = _problem(case, 5)
    x, target, params = x.to(device), target.to(device), _to(device, params)
    for name in ("adam amsgrad decay maximize", "sgd nesterov decay"):
        state = [_to(device, s) for s in _state(name, params)]
        adam = name.startswith("adam")
        op = ft.stack_adam_step_ if adam else ft.stack_sgd_step_
        args = (x, target, params, *_spec(case), *state, *UPDATES[name].values())
        first = [] if adam else [True]
        op(*args, *first)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            op(*args, *([] if adam else [False]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"{name}: no synchronization with the device")


def _main(device: str, *checks: str) -> None:
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device == "cpu"), \
        "CPU tensors need TRITON_INTERPRET=1, CUDA ones not"
    for what in checks:
        {"fwd_bwd": _check_fwd_bwd, "steps": _check_steps, "depth_1": _check_depth_1,
         "refused": _check_refused, "backend": _check_backend,
         "no_sync": _check_no_sync}[what](device)


if __name__ == "__main__":
    _main(*sys.argv[1:])
