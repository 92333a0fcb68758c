"""The whole training step, or the whole loop, of a layer stack in native code:
FusedTrainStep(model, optimizer, criterion)(x, y) and fit(model, optimizer, X, Y | loader, ...).

A stack is what fusedtrain.stacks recognises: nn.Linear layers, each optionally followed by one
elementwise activation, under an MSE, L1, SmoothL1, Huber, cross-entropy or BCE-with-logits loss;
one nn.Linear with nn.MSELoss is the stack of depth 1. Both read and write the optimizer's own
state (the keys torch.optim uses), so state_dict, schedulers that change param_group["lr"], and
going back to the stock loop all keep working.

``backend=`` ("auto", "native", "triton", "reference") picks the implementation as the optimizers
do (fusedtrain._dispatch). Native on the CPU runs the whole loop in one call (stack_fit_*_cpu), and
so does native on a GPU for a stack whose params, optimizer state and one batch fit a
multiprocessor's shared memory (stack_fit_*_cuda, one kernel launch); every other case loops in
Python over its train-step op (stack_adam_step_ or stack_sgd_step_), one call per batch, with the
same batches, shuffling, validation and history. Every backend
implements the stack ops; one nn.Linear under MSE is their depth-1 case, for which the native and
Triton kernels keep the linear_mse kernels (one pass over x for narrow outputs).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

import fusedtrain.optim
from fusedtrain import _dispatch, _extension, reference, stacks
from fusedtrain.optim import _common

_SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, fusedtrain.optim.SGD, fusedtrain.optim.Adam)


class FitHistory(NamedTuple):
    """Per-epoch losses: train_loss[e] is the mean of epoch e's batch losses, val_loss[e] the
    loss on the validation set after epoch e (None without one)."""

    train_loss: Tensor
    val_loss: Tensor | None


class _AdamState(NamedTuple):
    """adam_step_'s state lists, one tensor per param."""

    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty unless amsgrad
    steps: list[Tensor]


class _AdamHyper(NamedTuple):
    """adam_step_'s hyperparameters, in its order (and the fields of _C.AdamHyper)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool


class _SgdHyper(NamedTuple):
    """sgd_step_'s hyperparameters, in its order (and the fields of _C.SgdHyper)."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    first_step: bool


@functools.lru_cache(maxsize=8)
def _native(hyper: NamedTuple, cls):
    """The same settings as the native loop's _C.AdamHyper / _C.SgdHyper (the few a run of
    steps uses are kept: the loop only reads them)."""
    config = cls()
    for name, value in zip(hyper._fields, hyper):
        setattr(config, name, value)
    return config


class _KeptNativeStep(NamedTuple):
    """FusedTrainStep's path for the calls after a full one on the native kernels: what that call
    checked in Python is kept, by identity (the param group, optimizer.state, its per-param dicts
    and state tensors) or by value (the hyperparameters), and verified again in a few C loops.
    The batch is checked by the kernel itself; one that it refuses takes the full path, which
    names the problem (or converts the batch: a target to broadcast, uint8 classes) before
    anything is written. On the CPU the kernel is called without the dispatcher, through a
    _C.StackTrainer that keeps the gradient buffers from one step to the next."""

    backend_env: str | None  # FUSEDTRAIN_BACKEND then
    group: dict
    hyper_values: tuple  # _group_values(group) then
    state: dict  # optimizer.state
    dicts: list[dict]  # optimizer.state[p] for each param
    keys: tuple[str, ...]  # the entries of each dict the step uses
    tensors: list[Tensor]  # dicts[i][keys[k]] at [i * len(keys) + k]
    step: Callable[[Tensor, Tensor], Tensor]  # (x, y) -> loss


def _group_values(group: dict) -> tuple:
    """Every setting of a param group that the step's hyperparameters are read from."""
    return (group["lr"], group.get("betas"), group.get("eps"), group["weight_decay"], group.get("amsgrad"),
            group["maximize"], group.get("momentum"), group.get("dampening"), group.get("nesterov"),
            group.get("decoupled_weight_decay"))


class _Training:
    """What a fused step needs from a model, criterion and optimizer: checked once, the
    optimizer's hyperparameters and state read fresh at every call."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion, caller: str,
                 backend: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, _SUPPORTED_OPTIMIZERS):
            raise TypeError(f"{caller}: optimizer must be SGD, Adam or AdamW (torch.optim or "
                            f"fusedtrain.optim), got {type(optimizer).__name__}")
        try:
            self.stack = stacks.describe(model, criterion)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{caller}: {str(e).removeprefix('fusedtrain: ')}") from None
        self.params = self.stack.params()
        groups = optimizer.param_groups
        owned = [p for g in groups for p in g["params"]]
        if len(groups) != 1 or len(owned) != len(self.params) or any(
                not any(p is q for q in owned) for p in self.params):
            raise ValueError(f"{caller}: the optimizer must have one param group holding exactly "
                             "the model's params (each layer's weight and bias)")
        group = groups[0]
        if group.get("capturable") or group.get("differentiable"):
            raise ValueError(f"{caller}: capturable and differentiable optimizers are not supported")
        self.caller = caller
        self.optimizer = optimizer
        self.backend = backend
        self.adam = isinstance(optimizer, (torch.optim.Adam, fusedtrain.optim.Adam))
        self.device = self.params[0].device
        self.resolve_backend()  # an unknown one, or one that cannot run here, fails now
        self._native_spec = _extension._C.StackSpec(*self.stack.spec) if _extension.native_available() else None
        self._kept_native_step: _KeptNativeStep | None = None
        self._trainer = None  # _C.StackTrainer of the kept path on the CPU

    def step_op_name(self) -> str:
        return "stack_adam_step_" if self.adam else "stack_sgd_step_"

    def resolve_backend(self) -> str:
        """The concrete backend for the model's device now (FUSEDTRAIN_BACKEND is read at each
        call of a fused step); a named error if none can run there."""
        try:
            return _dispatch.resolve(self.backend, self.device, self.step_op_name())
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{self.caller}: {e}") from None

    def data(self, x: Tensor, y: Tensor, name: str = "") -> tuple[Tensor, Tensor]:
        """x (N, in) and the target as the ops take it, both contiguous, checked."""
        if isinstance(x, Tensor) and x.layout != torch.strided:  # nn.Linear takes a sparse x as its dense value
            x = x.to_dense()
        target = stacks.prepare_target(self.stack, x, y, f"{self.caller}: {name}".rstrip(": ") if name else self.caller)
        return x.contiguous(), target

    def hyper(self):
        """The param group's hyperparameters now, as the optimizer op's arguments."""
        group = self.optimizer.param_groups[0]
        lr = _common.as_float(group["lr"])
        if self.adam:
            beta1, beta2 = (_common.as_float(b) for b in group["betas"])
            decoupled = group.get("decoupled_weight_decay", False) or isinstance(
                self.optimizer, (torch.optim.AdamW, fusedtrain.optim.AdamW))
            return _AdamHyper(lr, beta1, beta2, group["eps"], _common.as_float(group["weight_decay"]),
                              decoupled, group["amsgrad"], group["maximize"])
        return _SgdHyper(lr, group["momentum"], group["dampening"], _common.as_float(group["weight_decay"]),
                         group["nesterov"], group["maximize"], False)

    def state(self, hyper) -> tuple[_AdamState | list[Tensor], list[Tensor]]:
        """The optimizer state the op updates, created as torch.optim would; and the momentum
        buffers that SGD starts in this call (to store in the optimizer's state afterwards)."""
        if not self.adam and hyper.momentum == 0:  # SGD without momentum keeps no state
            return [], []
        # One lookup per param: optimizer.state hashes a tensor in Python.
        states = [self.optimizer.state[p] for p in self.params]
        if self.adam:
            on_cpu = self.device.type == "cpu"
            for p, s in zip(self.params, states):
                if not s:
                    s["step"] = torch.tensor(0.0, dtype=_common.step_dtype())
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if hyper.amsgrad and "max_exp_avg_sq" not in s:
                    s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not on_cpu and s["step"].device != self.device:
                    # On a GPU the CUDA op reads the step count there, where fusedtrain.optim.Adam
                    # keeps it too (torch.optim.Adam keeps it on the CPU).
                    s["step"] = s["step"].to(self.device, torch.float32)
            return _AdamState([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                              [s["max_exp_avg_sq"] for s in states] if hyper.amsgrad else [],
                              [s["step"] for s in states]), []
        buffers = [s.get("momentum_buffer") for s in states]
        if any(b is None for b in buffers):  # torch starts every buffer as a copy of the first gradient
            buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]
            return buffers, buffers
        return buffers, []

    def run(self, x: Tensor, target: Tensor, epochs: int, batch_size: int, orders: Tensor | None,
            generator: torch.Generator | None, val: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """`epochs` epochs of batches of batch_size rows (0: the whole set), each epoch's rows in
        the order orders[e] (a shorter order leaves rows out, as a DataLoader's drop_last), else
        torch.randperm(N, generator=generator), else 0..N-1; (train losses, validation losses)."""
        # Everything that can refuse the call comes before the first change to the optimizer state.
        backend = self.resolve_backend()
        hyper = self.hyper()
        state, new_buffers = self.state(hyper)
        if new_buffers:
            hyper = hyper._replace(first_step=True)
        native_fit = self._native_fit(backend, x, batch_size, hyper)
        if native_fit is not None:
            data = _extension._C.FitData(x, target, epochs, batch_size, orders, generator,
                                         val[0] if val else None, val[1] if val else None)
            with torch.no_grad():  # the params' memory is written; autograd records nothing
                if self.adam:
                    result = native_fit(data, self.params, self._native_spec, *state,
                                        _native(hyper, _extension._C.AdamHyper))
                else:
                    result = native_fit(data, self.params, self._native_spec, state,
                                        _native(hyper, _extension._C.SgdHyper))
        else:
            step, loss = self._step_functions(backend, state, hyper)
            with torch.no_grad():
                result = _run_steps(step, loss, x, target, epochs, batch_size, orders, generator, val,
                                    hyper.first_step if not self.adam else False)
        if epochs > 0:  # else no step filled the new buffers
            for p, b in zip(self.params, new_buffers):
                self.optimizer.state[p]["momentum_buffer"] = b
        # What the LR schedulers' wrapper of optimizer.step() records, so that they do not warn
        # that the schedule runs ahead of the optimizer.
        self.optimizer._opt_called = True
        return result

    def _native_fit(self, backend: str, x: Tensor, batch_size: int, hyper) -> Callable | None:
        """The native loop that runs the whole of run() in one call, if any: the CPU's, or on a
        GPU the one-launch kernel when the params, optimizer state and one batch fit a
        multiprocessor's shared memory (the orders, given or drawn from the generator on the host,
        are the CPU loop's). Else None: one train-step op call per batch."""
        if backend != "native":
            return None
        kind = "adam" if self.adam else "sgd"
        if self.device.type == "cpu":
            return getattr(_extension._C, f"stack_fit_{kind}_cpu")
        if self.device.type != "cuda" or not hasattr(_extension._C, "stack_fit_supported_cuda"):
            return None
        state_lists = (3 if hyper.amsgrad else 2) if self.adam else (1 if hyper.momentum != 0 else 0)
        if not _extension._C.stack_fit_supported_cuda(self._native_spec, self.params, x, batch_size, state_lists):
            return None
        return getattr(_extension._C, f"stack_fit_{kind}_cuda")

    def remember_native_step(self) -> None:
        """After a full step: keep what it checked for the next ones (see _KeptNativeStep), when
        it ran the native kernels with hyperparameters that are plain numbers. Not for cross
        entropy on a GPU, whose kernels leave the class range to prepare_target's check (on the
        device it would wait for the device)."""
        self._kept_native_step = None
        group = self.optimizer.param_groups[0]
        values = _group_values(group)
        on_cpu = self.device.type == "cpu"
        if (self.resolve_backend() != "native" or not (on_cpu or self.stack.spec.loss != stacks.Loss.CROSS_ENTROPY)
                or any(isinstance(v, Tensor) for v in (*values, *(values[1] or ())))):
            return
        hyper = self.hyper()
        state, _ = self.state(hyper)
        if self.adam:
            keys = ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if hyper.amsgrad else ())
            lists = (*state, _native(hyper, _extension._C.AdamHyper)) if on_cpu else (*state, *hyper)
        else:
            keys = ("momentum_buffer",) if hyper.momentum != 0 else ()
            lists = (state, _native(hyper, _extension._C.SgdHyper)) if on_cpu else (state, *hyper)
        params = self.params if on_cpu else [p.detach() for p in self.params]
        if on_cpu:
            if self._trainer is None:  # kept as long as this object: its buffers serve every step
                self._trainer = _extension._C.StackTrainer(self._native_spec)
            run, spec = self._trainer.adam_step if self.adam else self._trainer.sgd_step, ()
        else:
            run, spec = getattr(torch.ops.fusedtrain, self.step_op_name()), self.stack.spec
        step = lambda x, y: run(x, y, params, *spec, *lists)  # noqa: E731
        dicts = [self.optimizer.state[p] for p in self.params] if keys else []
        self._kept_native_step = _KeptNativeStep(os.environ.get("FUSEDTRAIN_BACKEND"), group, values,
                                                 self.optimizer.state, dicts, keys,
                                                 [d[k] for d in dicts for k in keys], step)

    def kept_native_step(self, x: Tensor, y: Tensor) -> Tensor | None:
        """The loss of one step by the kept native path, if what the last full step checked
        still holds and the kernel takes the batch as it is; else None, nothing written."""
        kept = self._kept_native_step
        if (kept is None or type(x) is not Tensor or type(y) is not Tensor
                or os.environ.get("FUSEDTRAIN_BACKEND") != kept.backend_env
                or self.optimizer.param_groups[0] is not kept.group or _group_values(kept.group) != kept.hyper_values):
            return None
        if kept.keys and not (self.optimizer.state is kept.state
                              and _extension._C.same_items(kept.state, self.params, kept.dicts)
                              and _extension._C.entries_are(kept.dicts, kept.keys, kept.tensors)):
            return None
        try:
            loss = kept.step(x, y)
        except (RuntimeError, TypeError, ValueError, IndexError):  # refused before anything was written
            return None
        self.optimizer._opt_called = True  # as run() does
        return loss

    def evaluate(self, x: Tensor, target: Tensor) -> Tensor:
        """The loss of (x, target), no gradient work."""
        backend = self.resolve_backend()
        params = [p.detach() for p in self.params]
        return _dispatch.op("stack_fwd_bwd", backend, self.device)(x, target, params, *self.stack.spec, False)[0]

    def _step_functions(self, backend: str, state, hyper) -> tuple[Callable, Callable]:
        """step(x, target, first_step) -> loss and loss(x, target) -> loss of `backend`'s ops."""
        params = [p.detach() for p in self.params]
        spec = self.stack.spec
        op = _dispatch.op(self.step_op_name(), backend, self.device)
        if self.adam:
            step = lambda x, t, first: op(x, t, params, *spec, *state, *hyper)  # noqa: E731
        else:
            step = lambda x, t, first: op(x, t, params, *spec, state, *hyper._replace(first_step=first))  # noqa: E731
        return step, self.evaluate


def _to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; a CPU tensor bound for a GPU goes through pinned memory, so that the
    copy queues on the stream instead of making the host wait for the steps before it."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _run_steps(step, loss, x, target, epochs, batch_size, orders, generator, val,
               first_step) -> tuple[Tensor, Tensor]:
    """The native loop's epochs in Python, one step() call per batch; on a GPU a few kernel
    launches each and no host synchronisation, the losses staying on the device."""
    n = x.shape[0]
    train, valid = [], []
    for epoch in range(epochs):
        order = (orders[epoch] if orders is not None
                 else torch.randperm(n, generator=generator) if generator is not None else None)
        order = _to_device_async(order, x.device) if order is not None else None
        rows_used = order.shape[0] if order is not None else n
        batch = batch_size or max(rows_used, 1)  # the whole set: one batch
        losses = []
        for start in range(0, max(rows_used, 1), batch):  # no rows: one empty batch, as the stock loop
            rows = slice(start, start + batch) if order is None else order[start:start + batch]
            losses.append(step(x[rows], target[rows], first_step))
            first_step = False
        # The mean of the batch losses in double, as the native loop takes it.
        train.append(torch.stack(losses).mean(dtype=torch.float64))
        if val:
            valid.append(loss(*val))
    empty = x.new_empty(0)
    return (torch.stack(train).to(x.dtype) if train else empty), (torch.stack(valid).to(x.dtype) if valid else empty)


class FusedTrainStep:
    """``step(x, y)``: the forward pass of a layer stack, the loss, the gradients and the
    optimizer's update, in one native call; returns the loss (detached).

    Equals ``opt.zero_grad(); loss = criterion(model(x), y); loss.backward(); opt.step()`` except
    that the params' ``.grad`` is left as it was. ``model``: an nn.Linear, an nn.Sequential of
    Linear layers each optionally followed by one activation, or any module whose forward
    torch.fx traces to such a chain (see fusedtrain.stacks). ``criterion``: nn.MSELoss (the
    default), L1Loss, SmoothL1Loss, HuberLoss, CrossEntropyLoss or BCEWithLogitsLoss. The
    optimizer (torch.optim or fusedtrain.optim SGD, Adam or AdamW) must have one param group
    holding exactly the model's params. ``backend`` ("auto", "native", "triton", "reference")
    picks the implementation of the step, as for the optimizers; see ``python -m fusedtrain info``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module | None = None,
                 *, backend: str = "auto") -> None:
        self._training = _Training(model, optimizer, criterion, "FusedTrainStep", backend)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        training = self._training
        loss = training.kept_native_step(x, y)
        if loss is None:
            x, target = training.data(x, y)
            loss = training.run(x, target, 1, 0, None, None, None)[0][0]
            training.remember_native_step()
        return loss


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, X: Tensor | DataLoader, Y: Tensor | None = None,
        *, epochs: int, criterion: nn.Module | None = None, batch_size: int | None = None,
        shuffle: bool = False, generator: torch.Generator | None = None,
        val: tuple[Tensor, Tensor] | None = None, progress: bool = False,
        backend: str = "auto") -> FitHistory:
    """Trains a layer stack (see FusedTrainStep) on (X, Y), or on the batches of a DataLoader,
    for ``epochs`` epochs, the whole loop in native code on the CPU, and in one kernel launch on a
    GPU for a small stack (elsewhere, or with another backend, one op call per batch). With
    tensors it equals the stock loop::

        for epoch in range(epochs):
            order = torch.randperm(len(X), generator=generator) if shuffle else torch.arange(len(X))
            for batch in order.split(batch_size or len(X)):
                opt.zero_grad(); criterion(model(X[batch]), Y[batch]).backward(); opt.step()

    With a DataLoader (and Y, batch_size, shuffle and generator left out) it equals
    ``for x, y in loader: ...``: over a TensorDataset of (X, Y) it reads the tensors, the batch
    size, shuffling, drop_last and generator, and draws the very batches that iterating the loader
    would, all epochs in one native call; over any other dataset it iterates the loader and runs
    each batch as one native step. ``batch_size=None`` is the full batch. ``val=(X_val, Y_val)``
    adds the validation loss after each epoch (no gradient work). ``progress=True`` shows a
    progress bar (tqdm if installed), returning to Python once per epoch for it.
    """
    training = _Training(model, optimizer, criterion, "fit", backend)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, got {epochs!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"fit: batch_size must be a positive int or None, got {batch_size!r}")
    val = training.data(*val, name="val") if val is not None else None
    if isinstance(X, DataLoader):
        if Y is not None or batch_size is not None or shuffle or generator is not None:
            raise ValueError("fit: with a DataLoader, leave Y, batch_size, shuffle and generator out: "
                             "the loader has them")
        tensors = _loader_tensors(X)
        if tensors is None:
            return _fit_by_batches(training, X, epochs, val, progress)
        x, target = training.data(*tensors)
        batch, orders, generator = X.batch_size, _loader_orders(X, epochs), None
    else:
        x, target = training.data(X, Y)
        if shuffle and generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()))
        batch, orders, generator = batch_size or 0, None, generator if shuffle else None
    if not progress:
        return FitHistory(*_with_val(training.run(x, target, epochs, batch, orders, generator, val), val))
    parts = []
    with _ProgressBar(epochs) as bar:
        for epoch in range(epochs):
            epoch_order = orders[epoch:epoch + 1] if orders is not None else None
            parts.append(training.run(x, target, 1, batch, epoch_order, generator, val))
            bar.update(parts[-1][0].item())
    return FitHistory(*_with_val(_concatenate(parts, x), val))


def _with_val(result: tuple[Tensor, Tensor], val) -> tuple[Tensor, Tensor | None]:
    return result[0], (result[1] if val is not None else None)


def _concatenate(parts: list[tuple[Tensor, Tensor]], like: Tensor) -> tuple[Tensor, Tensor]:
    if not parts:
        return like.new_empty(0), like.new_empty(0)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _loader_tensors(loader: DataLoader) -> tuple[Tensor, Tensor] | None:
    """(X, Y) when the loader's batches are rows of a TensorDataset(X, Y) drawn by its own
    sequential or random sampler (so the native loop can draw them itself); else None."""
    dataset = loader.dataset
    if not (isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2
            and loader.collate_fn is default_collate and loader.batch_size is not None
            and type(loader.batch_sampler) is BatchSampler):
        return None
    sampler = loader.sampler
    if type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                               and sampler.num_samples == len(dataset)):
        return dataset.tensors
    return None


def _loader_orders(loader: DataLoader, epochs: int) -> Tensor | None:
    """The row order of each epoch, drawn exactly as iterating the loader draws it: creating its
    iterator takes a base seed from the loader's generator (or the global one), then the sampler
    runs (RandomSampler seeds its own generator from the global one when it has none); the batch
    sampler only groups the sampler's indices, without drop_last's short last batch. None when
    every epoch takes all the rows in order."""
    in_order = type(loader.sampler) is SequentialSampler
    rows = len(loader.sampler) // loader.batch_size * loader.batch_size if loader.drop_last else len(loader.sampler)
    draw = _random_sampler_order if not in_order and _random_sampler_is_reproduced() else None
    orders = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        if not in_order:
            order = draw(loader.sampler) if draw else torch.tensor(list(loader.sampler), dtype=torch.int64)
            orders.append(order[:rows])
    if in_order and loader.drop_last and epochs > 0:
        return torch.arange(rows).expand(epochs, rows)
    return torch.stack(orders) if orders else None


def _random_sampler_order(sampler: RandomSampler) -> Tensor:
    """What list(sampler) draws, as one tensor (a Python int per row costs more than the native
    epoch's steps): RandomSampler without replacement over all rows draws one permutation for
    them, then a second one that it slices to nothing (torch/utils/data/sampler.py; seeded from
    the global generator when it has none of its own). _random_sampler_is_reproduced checks this
    against the installed torch."""
    n = len(sampler.data_source)
    generator = sampler.generator
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return order


@functools.cache
def _random_sampler_is_reproduced() -> bool:
    """Whether _random_sampler_order draws what iterating a RandomSampler draws and leaves its
    generator (its own, or the global one) in the same state: checked once per process, so that
    another torch's sampler falls back to being iterated."""
    for own_generator in (True, False):
        results = []
        for draw in (lambda s: torch.tensor(list(s), dtype=torch.int64), _random_sampler_order):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(3)
                generator = torch.Generator().manual_seed(5) if own_generator else None
                order = draw(RandomSampler(range(11), generator=generator))
                results.append((order, (generator or torch.default_generator).get_state()))
        (want, want_state), (got, got_state) = results
        if not (torch.equal(got, want) and torch.equal(got_state, want_state)):
            return False
    return True


def _fit_by_batches(training: _Training, loader: DataLoader, epochs: int, val, progress: bool) -> FitHistory:
    """A loader over any other dataset: its batches as it yields them, one native step each."""
    train, valid = [], []
    with _ProgressBar(epochs if progress else 0) as bar:
        for _ in range(epochs):
            losses = []
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError(f"fit: the DataLoader must yield (x, y) batches, got {type(batch).__name__}"
                                    + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
                x, target = training.data(*batch)
                losses.append(training.run(x, target, 1, 0, None, None, None)[0])
            epoch_loss = torch.cat(losses).mean(dtype=torch.float64) if losses else torch.tensor(float("nan"))
            train.append(epoch_loss)
            if val is not None:
                valid.append(training.evaluate(*val))
            bar.update(float(epoch_loss))
    dtype = training.params[0].dtype
    train_loss = torch.stack(train).to(dtype) if train else torch.empty(0, dtype=dtype)
    return FitHistory(train_loss, (torch.stack(valid) if valid else torch.empty(0, dtype=dtype)) if val is not None else None)


class _ProgressBar:
    """Epochs done and the last loss: tqdm's bar if tqdm is installed, else a plain one on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.bar = total, 0, None

    def __enter__(self):
        if self.total > 0:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=self.total, desc="fit", unit="epoch")
        return self

    def update(self, loss: float) -> None:
        if self.total == 0:
            return
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.6g}")
            self.bar.update(1)
            return
        width = 30
        filled = width * self.done // self.total
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(f"\rfit [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"loss {loss:.6g}{end}")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
