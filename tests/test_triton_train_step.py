"""The Triton train step (fusedtrain.triton.linear_mse_train_step_) against the native CPU op
torch.ops.fusedtrain.linear_mse_train_step_, and fit / FusedTrainStep with backend="triton"
against backend="native": on CPU tensors under the Triton interpreter, and compiled on CUDA
tensors where a GPU is present (the native results then come from CPU copies).

TRITON_INTERPRET=1 must be set before triton is imported, so each test runs this file as a
script in a fresh process (see tests/helpers.py run_triton_checks). The interpreter is slow:
the shapes are small and the runs short.
"""

from __future__ import annotations

import copy
import os
import re
import sys

import pytest
import torch

import fusedtrain
from helpers import run_triton_checks

pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(not fusedtrain._extension.native_available(),
                                reason="native extension not built: it is the oracle")


def _run_checks(*args: str, device: str = "cpu") -> None:
    run_triton_checks(__file__, *args, device=device)


def test_train_step_op_matches_native_op_and_refused_calls_change_nothing():
    _run_checks("op", "refused")


def test_fit_and_fused_train_step_with_triton_backend_match_native():
    _run_checks("backend")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernels_on_cuda_match_native():
    _run_checks("op", "refused", "backend", "no_sync", device="cuda")


# ---- The checks, run in the subprocess ------------------------------------------------------

# The optimizer arguments of linear_mse_train_step_ after `state`, first_step aside: adam, lr,
# weight_decay, maximize, beta1, beta2, eps, decoupled, amsgrad, momentum, dampening, nesterov.
ADAM = dict(adam=True, lr=0.01, weight_decay=0.0, maximize=False, beta1=0.9, beta2=0.999,
            eps=1e-8, decoupled=False, amsgrad=False, momentum=0.0, dampening=0.0,
            nesterov=False)
SGD = dict(ADAM, adam=False, lr=0.05, beta1=0.0, beta2=0.0, eps=0.0)
UPDATES = {
    "adam": ADAM,
    "adam-amsgrad-decay-maximize": dict(ADAM, amsgrad=True, weight_decay=0.05, maximize=True),
    "adamw": dict(ADAM, decoupled=True, weight_decay=0.1),
    "sgd": SGD,
    "sgd-momentum-dampening": dict(SGD, momentum=0.9, dampening=0.3),
    "sgd-nesterov-decay": dict(SGD, momentum=0.9, nesterov=True, weight_decay=0.01),
}
# Closeness to the native op after a few steps (the two reduce in different orders).
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _state(update: dict, weight, bias) -> list:
    """Fresh optimizer state in the op's order (csrc/cpu/linear_mse_fit.h)."""
    params = [weight] if bias is None else [weight, bias]
    if update["adam"]:
        moments = 3 if update["amsgrad"] else 2
        return ([torch.zeros_like(p) for _ in range(moments) for p in params]
                + [torch.tensor(0.0, device=weight.device) for _ in params])
    return [torch.zeros_like(p) for p in params] if update["momentum"] != 0 else []


def _problem(n, n_in, n_out, has_bias, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)

    return draw(n, n_in), draw(n, n_out), draw(n_out, n_in), draw(n_out) if has_bias else None


def _cpu(tensors):
    return [None if t is None else t.cpu() for t in tensors]


def _op_cases():
    """(update name, has_bias, out, dtype, reduction): every update with and without bias, out 1
    and 3, in fp32 under "mean"; and each update once more in fp64 under "sum"."""
    for k, name in enumerate(UPDATES):
        for has_bias in (True, False):
            for n_out in (1, 3):
                yield name, has_bias, n_out, torch.float32, 1
        yield name, k % 2 == 0, 1 + 2 * (k // 2 % 2), torch.float64, 2


def _check_op(device: str) -> None:
    """The loss of each of 3 steps, then weight, bias and the state, against the native op on
    CPU copies of the same tensors."""
    from fusedtrain.triton import linear_mse_train_step_

    native = torch.ops.fusedtrain.linear_mse_train_step_
    count = 0
    for seed, (name, has_bias, n_out, dtype, reduction) in enumerate(_op_cases()):
        update = UPDATES[name]
        label = f"{name} bias={has_bias} out={n_out} {dtype} reduction={reduction}"
        x, y, weight, bias = _problem(12, 5, n_out, has_bias, dtype, device, seed)
        state = _state(update, weight, bias)
        want_x, want_y, want_w, want_b = _cpu([x, y, weight.clone(),
                                               None if bias is None else bias.clone()])
        want_state = [s.cpu().clone() for s in state]
        for step in range(3):
            got = linear_mse_train_step_(x, y, weight, bias, reduction, state, *update.values(),
                                         step == 0)
            want = native(want_x, want_y, want_w, want_b, reduction, want_state, *update.values(),
                          step == 0)
            assert got.shape == () and got.dtype == dtype, label
            torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype],
                                       msg=lambda m: f"{label} step {step}: {m}")
        pairs = [(weight, want_w), (bias, want_b)] + list(zip(state, want_state))
        for got_t, want_t in pairs:
            if want_t is not None:
                torch.testing.assert_close(got_t.cpu(), want_t, **TOLERANCE[dtype],
                                           msg=lambda m: f"{label}: {m}")
        count += 1
    print(f"train step op: {count} cases ok")


def _check_refused(device: str) -> None:
    """State lists of the wrong length, step counts that are not one float, state of the wrong
    shape: a named error, and weight, bias and state as they were."""
    from fusedtrain.triton import linear_mse_train_step_

    x, y, weight, bias = _problem(6, 3, 2, True, torch.float32, device, 0)
    adam = _state(ADAM, weight, bias)
    cases = [
        (ValueError, "state has 5 tensors, expected 6", ADAM, adam[:5]),
        (ValueError, "state has 0 tensors, expected 2", dict(SGD, momentum=0.9), []),
        (ValueError, "state has 2 tensors, expected 0", SGD, adam[:2]),
        (ValueError, r"state\[4\] \(a step count\) must have one element",
         ADAM, adam[:4] + [torch.zeros(2, device=device), adam[5]]),
        (TypeError, r"state\[5\] \(a step count\) must be float32 or float64",
         ADAM, adam[:5] + [torch.tensor(0, device=device)]),
        (ValueError, "must agree", ADAM, [adam[1]] + adam[1:]),
        (ValueError, "must agree", dict(SGD, momentum=0.9), [adam[0], adam[0]]),
    ]
    for error, pattern, update, state in cases:
        before = [t.clone() for t in [weight, bias, *state]]
        try:
            linear_mse_train_step_(x, y, weight, bias, 1, state, *update.values(), False)
        except error as e:
            assert re.search(pattern, str(e)), f"{pattern!r} not in {e}"
            print(f"refused as expected: {e}")
        else:
            raise AssertionError(f"{pattern}: no {error.__name__}")
        for was, t in zip(before, [weight, bias, *state]):
            assert torch.equal(was, t), f"{pattern}: a tensor changed"
    print("refused calls: ok")


def _check_backend(device: str) -> None:
    """fit (shuffled batches, a last partial batch, validation) and FusedTrainStep with
    backend="triton" against backend="native" on CPU copies: losses, params, optimizer state."""
    optimizers = [
        ("Adam", {"lr": 0.05}),
        ("AdamW", {"lr": 0.05, "amsgrad": True}),
        ("SGD", {"lr": 0.05}),
        ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(19, 4, generator=g), torch.randn(19, 2, generator=g)
    val = (torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g))
    for name, kwargs in optimizers:
        torch.manual_seed(1)
        native_model = torch.nn.Linear(4, 2)
        native_opt = getattr(fusedtrain.optim, name)(native_model.parameters(), **kwargs)
        triton_model = copy.deepcopy(native_model).to(device)
        triton_opt = getattr(torch.optim, name)(triton_model.parameters(), **kwargs)
        for label, train in [
            ("fit", lambda model, opt, backend, on: fusedtrain.fit(
                model, opt, x.to(on), y.to(on), epochs=2, batch_size=8, shuffle=True,
                generator=torch.Generator().manual_seed(3), val=tuple(t.to(on) for t in val),
                backend=backend)),
            ("FusedTrainStep", lambda model, opt, backend, on: [
                fusedtrain.FusedTrainStep(model, opt, backend=backend)(x.to(on), y.to(on))
                for _ in range(3)]),
        ]:
            want = train(native_model, native_opt, "native", "cpu")
            got = train(triton_model, triton_opt, "triton", device)
            where = f"{name} {kwargs} {label}"
            for a, b in zip(list(got), list(want)):  # fit: train and val losses; steps: losses
                torch.testing.assert_close(a.cpu(), b, msg=lambda m: f"{where}: {m}")
            for a, b in zip(triton_model.parameters(), native_model.parameters()):
                torch.testing.assert_close(a.detach().cpu(), b.detach(), msg=lambda m: f"{where}: {m}")
            got_state, want_state = triton_opt.state_dict()["state"], native_opt.state_dict()["state"]
            for index, entries in want_state.items():
                assert got_state[index].keys() == entries.keys(), where
                for key, value in entries.items():
                    torch.testing.assert_close(got_state[index][key].cpu(), value,
                                               msg=lambda m: f"{where} state {key}: {m}")
            print(f"{where}: ok")


def _check_no_sync(device: str) -> None:
    """On CUDA, a train step of each optimizer never waits for the device (torch's sync debug
    mode turns any synchronization into an error): the step counts stay on the device."""
    from fusedtrain.triton import linear_mse_train_step_

    for name in ("adam-amsgrad-decay-maximize", "sgd-nesterov-decay"):
        update = UPDATES[name]
        x, y, weight, bias = _problem(40, 7, 2, True, torch.float32, device, 5)
        state = _state(update, weight, bias)
        linear_mse_train_step_(x, y, weight, bias, 1, state, *update.values(), True)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            linear_mse_train_step_(x, y, weight, bias, 1, state, *update.values(), False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"{name}: no synchronization with the device")


def _main(device: str, *checks: str) -> None:
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device == "cpu"), \
        "CPU tensors need TRITON_INTERPRET=1, CUDA ones not"
    for what in checks:
        {"op": _check_op, "refused": _check_refused, "backend": _check_backend,
         "no_sync": _check_no_sync}[what](device)


if __name__ == "__main__":
    _main(*sys.argv[1:])
