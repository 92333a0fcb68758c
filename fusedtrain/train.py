"""The whole training step, or the whole loop, of a linear model with an MSE loss in one native
call: FusedTrainStep(model, optimizer)(x, y) and fit(model, optimizer, X, Y, epochs=...).

Both read and write the optimizer's own state (the keys torch.optim uses), so state_dict,
schedulers that change param_group["lr"], and going back to the stock loop all keep working.

``backend=`` ("auto", "native", "triton", "reference") picks the implementation as the optimizers
do (fusedtrain._dispatch). Native on CPU runs the whole loop in one call (linear_mse_fit_cpu);
every other backend, and native on CUDA, loops in Python over the op linear_mse_train_step_ of
that backend, one call per batch, with the same batches, shuffling, validation and history.
"""

from __future__ import annotations

import operator
import sys
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

import fusedtrain.optim
from fusedtrain import _dispatch, _extension, reference
from fusedtrain.optim import _common

_SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, fusedtrain.optim.SGD, fusedtrain.optim.Adam)


class FitHistory(NamedTuple):
    """Per-epoch losses: train_loss[e] is the mean of epoch e's batch losses, val_loss[e] the
    loss on the validation set after epoch e (None without one)."""

    train_loss: Tensor
    val_loss: Tensor | None


class _Update(NamedTuple):
    """How the optimizer updates weight and bias: the optimizer arguments of the op
    linear_mse_train_step_ in its order (first_step, which changes from call to call, aside),
    which are also the fields of the native loop's FitOptimizer."""

    adam: bool
    lr: float
    weight_decay: float
    maximize: bool
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def native(self):
        """The same settings as the native loop's _C.FitOptimizer."""
        config = _extension._C.FitOptimizer()
        for name, value in zip(self._fields, self):
            setattr(config, name, value)
        return config


class _LinearMSETraining:
    """What a fused step needs from a model and its optimizer, checked once, read fresh per call."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, caller: str,
                 backend: str) -> None:
        if not isinstance(model, nn.Linear):
            raise TypeError(f"{caller}: model must be a torch.nn.Linear, got {type(model).__name__}")
        if not isinstance(optimizer, _SUPPORTED_OPTIMIZERS):
            raise TypeError(f"{caller}: optimizer must be SGD, Adam or AdamW (torch.optim or "
                            f"fusedtrain.optim), got {type(optimizer).__name__}")
        self.params = [model.weight] + ([model.bias] if model.bias is not None else [])
        groups = optimizer.param_groups
        owned = [p for g in groups for p in g["params"]]
        if len(groups) != 1 or len(owned) != len(self.params) or any(
                not any(p is q for q in owned) for p in self.params):
            raise ValueError(f"{caller}: the optimizer must have one param group holding exactly "
                             "the model's weight and bias")
        group = groups[0]
        if group.get("capturable") or group.get("differentiable"):
            raise ValueError(f"{caller}: capturable and differentiable optimizers are not supported")
        if model.weight.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{caller}: the model must be float32 or float64, got {model.weight.dtype}")
        self.caller = caller
        self.model = model
        self.optimizer = optimizer
        self.backend = backend
        self.resolve_backend(model.weight.device)  # an unknown one, or one that cannot run here, fails now
        self.adam = isinstance(optimizer, (torch.optim.Adam, fusedtrain.optim.Adam))
        self._read_hyper = operator.itemgetter(*(
            k for k in ("lr", "weight_decay", "maximize", "betas", "eps", "amsgrad",
                        "decoupled_weight_decay", "momentum", "dampening", "nesterov") if k in group))
        self._hyper = None  # the group's values the update was configured from
        self._configured = None  # ... as plain numbers
        self._hyper_has_tensor = False

    def resolve_backend(self, device: torch.device) -> str:
        """The concrete backend for `device` now (FUSEDTRAIN_BACKEND is read at each call, as by
        the optimizers' steps); a named error if none can run there."""
        try:
            return _dispatch.resolve(self.backend, device)
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{self.caller}: {e}") from None

    def data(self, x: Tensor, y: Tensor, name: str = "") -> tuple[Tensor, Tensor]:
        """x (N, in) and the target expanded to (N, out), both contiguous, checked."""
        weight = self.model.weight
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"{self.caller}: {name}x must have shape (N, {weight.shape[1]}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.layout != torch.strided:  # nn.Linear takes a sparse input as its dense value
            x = x.to_dense()
        for label, t in ((f"{name}x", x), (f"{name}y", y)):
            if not isinstance(t, Tensor) or t.layout != torch.strided:
                raise TypeError(f"{self.caller}: {label} must be a dense tensor, got "
                                f"{t.layout if isinstance(t, Tensor) else type(t).__name__}")
            if t.dtype != weight.dtype or t.device != weight.device:
                raise TypeError(f"{self.caller}: {label} is {t.dtype} on {t.device} but the model is "
                                f"{weight.dtype} on {weight.device}")
        pred_shape = torch.Size((x.shape[0], weight.shape[0]))
        if y.shape == pred_shape:
            return x.contiguous(), y.contiguous()
        try:
            fits = torch.broadcast_shapes(pred_shape, y.shape) == pred_shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{self.caller}: {name}y of shape {tuple(y.shape)} does not broadcast to "
                             f"the prediction's shape {tuple(pred_shape)}")
        warnings.warn(
            f"Using a target size ({y.size()}) that is different to the input size ({pred_shape}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
        return x.contiguous(), y.expand(pred_shape).contiguous()

    def state(self, device: torch.device) -> tuple[list[Tensor], list[Tensor], bool]:
        """The optimizer state tensors in the op's order (created as torch.optim would), with
        self.update set from the param group; the momentum buffers to store after the call when
        SGD starts them; and whether it does (the op's first_step)."""
        group = self.optimizer.param_groups[0]
        hyper = self._read_hyper(group)
        # The same plain values as last time need no more work; a tensor (lr) may have changed in place.
        if self._hyper_has_tensor or hyper != self._hyper:
            plain = _plain(hyper)
            if plain != self._configured:  # a scheduler changed something: push it to the config
                self._configure(group)
                self._configured = plain
            self._hyper = hyper
            self._hyper_has_tensor = _has_tensor(hyper)
        state = self.optimizer.state
        if self.adam:
            on_cpu = device.type == "cpu"
            for p in self.params:
                s = state[p]
                if not s:
                    s["step"] = torch.tensor(0.0, dtype=_common.step_dtype())
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if self.update.amsgrad:
                        s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not on_cpu and s["step"].device != device:
                    # On a GPU the CUDA op reads the step count there, where fusedtrain.optim.Adam
                    # keeps it too (torch.optim.Adam keeps it on the CPU).
                    s["step"] = s["step"].to(device, torch.float32)
            return [state[p][k] for k in self._state_keys for p in self.params], [], False
        if self.update.momentum == 0:
            return [], [], False
        buffers = [state[p].get("momentum_buffer") for p in self.params]
        if any(b is None for b in buffers):  # torch starts every buffer as a copy of the first gradient
            buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]
            return buffers, buffers, True
        return buffers, [], False

    def _configure(self, group: dict) -> None:
        common = dict(adam=self.adam, lr=_common.as_float(group["lr"]),
                      weight_decay=_common.as_float(group["weight_decay"]), maximize=group["maximize"])
        if self.adam:
            beta1, beta2 = (_common.as_float(b) for b in group["betas"])
            decoupled = group.get("decoupled_weight_decay", False) or isinstance(
                self.optimizer, (torch.optim.AdamW, fusedtrain.optim.AdamW))
            self.update = _Update(**common, beta1=beta1, beta2=beta2, eps=group["eps"],
                                  decoupled=decoupled, amsgrad=group["amsgrad"])
            self._state_keys = (("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
                                + ("step",))
        else:
            self.update = _Update(**common, momentum=group["momentum"], dampening=group["dampening"],
                                  nesterov=group["nesterov"])
        self._native = self.update.native() if _extension.native_available() else None

    def run(self, x: Tensor, y: Tensor, epochs: int, batch_size: int, generator, val) -> tuple[Tensor, Tensor]:
        # Everything that can refuse the call comes before the first change to the optimizer state.
        device = x.device  # the model's, as data() checked
        backend = self.resolve_backend(device)
        if backend == "native" and device.type == "cpu":
            state, new_buffers, first_step = self.state(device)
            self._native.first_step = first_step
            # The params go in as they are: the native loop writes their memory and records no autograd.
            result = _extension._C.linear_mse_fit_cpu(
                x, y, self.model.weight, self.model.bias,
                reference.MEAN, epochs, batch_size, generator, val[0] if val else None,
                val[1] if val else None, state, self._native)
        else:
            step_op = _dispatch.op("linear_mse_train_step_", backend, device)
            loss_op = _dispatch.op("linear_mse_fwd_bwd", backend, device)
            state, new_buffers, first_step = self.state(device)
            result = self._run_steps(step_op, loss_op, x, y, epochs, batch_size, generator, val,
                                     state, first_step)
        if epochs > 0:  # else no step filled the new buffers
            for p, b in zip(self.params, new_buffers):
                self.optimizer.state[p]["momentum_buffer"] = b
        # What the LR schedulers' wrapper of optimizer.step() records, so that they do not warn
        # that the schedule runs ahead of the optimizer.
        self.optimizer._opt_called = True
        return result

    def _run_steps(self, step_op, loss_op, x, y, epochs, batch_size, generator, val, state,
                   first_step) -> tuple[Tensor, Tensor]:
        """The native loop's epochs in Python, one step_op call per batch; on a GPU a few kernel
        launches each and no host synchronisation, the losses staying on the device."""
        n = x.shape[0]
        batch = batch_size or max(n, 1)  # the whole set: one batch
        weight, bias = self.model.weight.detach(), (self.model.bias.detach() if self.model.bias is not None else None)
        train, valid = [], []
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
            losses = []
            for start in range(0, max(n, 1), batch):  # no rows: one empty batch, as the stock loop
                rows = slice(start, start + batch) if order is None else order[start:start + batch]
                losses.append(step_op(x[rows], y[rows], weight, bias, reference.MEAN, state,
                                      *self.update, first_step))
                first_step = False
            # The mean of the batch losses in double, as the native loop takes it.
            train.append(torch.stack(losses).mean(dtype=torch.float64))
            if val:
                valid.append(loss_op(val[0], weight, bias, val[1], reference.MEAN, False, False)[0])
        empty = x.new_empty(0)
        return (torch.stack(train).to(x.dtype) if train else empty), (torch.stack(valid) if valid else empty)


class FusedTrainStep:
    """``step(x, y)``: the forward pass of an nn.Linear, the MSE loss (mean), the gradients and
    the optimizer's update, in one native call; returns the loss (detached).

    Equals ``opt.zero_grad(); loss = mse_loss(model(x), y); loss.backward(); opt.step()`` except
    that the params' ``.grad`` is left as it was. The optimizer (torch.optim or fusedtrain.optim
    SGD, Adam or AdamW) must have one param group holding exactly the model's params.
    ``backend`` ("auto", "native", "triton", "reference") picks the implementation of the step,
    as for the optimizers; see ``python -m fusedtrain info``.
    """

    def __init__(self, model: nn.Linear, optimizer: torch.optim.Optimizer, *,
                 backend: str = "auto") -> None:
        self._training = _LinearMSETraining(model, optimizer, "FusedTrainStep", backend)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        # No autograd context needed: every backend's op sees detached params and records nothing.
        x, y = self._training.data(x, y)
        losses, _ = self._training.run(x, y, 1, 0, None, None)
        return losses[0]


def fit(model: nn.Linear, optimizer: torch.optim.Optimizer, X: Tensor, Y: Tensor, *, epochs: int,
        batch_size: int | None = None, shuffle: bool = False, generator: torch.Generator | None = None,
        val: tuple[Tensor, Tensor] | None = None, progress: bool = False,
        backend: str = "auto") -> FitHistory:
    """Trains ``model`` on (X, Y) with MSE loss (mean) for ``epochs`` epochs, the whole loop in
    native code (on CPU; elsewhere, or with another backend, one op call per batch). Equals the
    stock loop::

        for epoch in range(epochs):
            order = torch.randperm(len(X), generator=generator) if shuffle else torch.arange(len(X))
            for batch in order.split(batch_size or len(X)):
                opt.zero_grad(); mse_loss(model(X[batch]), Y[batch]).backward(); opt.step()

    ``batch_size=None`` is the full batch. ``val=(X_val, Y_val)`` adds the validation loss after
    each epoch (no gradient work). ``progress=True`` prints a progress bar, returning to Python
    once per epoch for it (and only then). ``backend`` ("auto", "native", "triton", "reference")
    picks the implementation, as for the optimizers; see ``python -m fusedtrain info``.
    """
    training = _LinearMSETraining(model, optimizer, "fit", backend)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"fit: batch_size must be a positive int or None, got {batch_size!r}")
    x, y = training.data(X, Y)
    val = training.data(*val, name="val ") if val is not None else None
    if shuffle and generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()))
    order = generator if shuffle else None
    with torch.no_grad():
        if not progress:
            train, valid = training.run(x, y, epochs, batch_size or 0, order, val)
        else:
            parts = []
            for epoch in range(epochs):
                parts.append(training.run(x, y, 1, batch_size or 0, order, val))
                _print_progress(epoch + 1, epochs, parts[-1][0].item())
            train = torch.cat([p[0] for p in parts]) if parts else x.new_empty(0)
            valid = torch.cat([p[1] for p in parts]) if parts else x.new_empty(0)
    return FitHistory(train, valid if val is not None else None)


def _has_tensor(value) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, tuple) and any(map(_has_tensor, value)))


def _plain(value):
    """A hyperparameter as a value that compares by content (a tensor lr may change in place)."""
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _print_progress(done: int, total: int, loss: float, width: int = 30) -> None:
    filled = width * done // total
    end = "\n" if done == total else ""
    sys.stderr.write(f"\rfit [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.6g}{end}")
    sys.stderr.flush()
