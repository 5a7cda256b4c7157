"""The one training loop, plus ``evaluate`` and ``predict``.

Everything in modelfuse that trains (pools, fusion heads, learned ensemble weights, snapshot
ensembles, SWA, distillation, multi-task losses, gradient surgery) goes through
:func:`train`: a custom ``loss(model, batch)``, ``param_groups``, an optimizer or schedule
factory and :class:`Callback` hooks cover those cases without another copy of the loop.
Training is seeded and leaves the caller's global RNG untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from modelfuse.data.splits import Splits
from modelfuse.errors import ConfigError
from modelfuse.progress import progress as progress_bar
from modelfuse.zoo.metrics import accuracy_nll

Batch = tuple[Any, ...]
LossFn = Callable[[nn.Module, Batch], Any]
BackwardFn = Callable[[Any], Any]
OptimizerArg = str | Callable[[Any], torch.optim.Optimizer]
ScheduleArg = str | Callable[[torch.optim.Optimizer, int], Any] | None

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass
class TrainState:
    """What callbacks see: the live model and optimizer, counters, the last loss and the history.

    Set ``stop = True`` (or call :meth:`request_stop`) to end training after the current
    step; ``batch`` is the current batch, already on the training device.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    epoch: int = 0
    step: int = 0
    loss: float = math.nan
    batch: Batch | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False

    def request_stop(self) -> None:
        self.stop = True


class Callback:
    """Hooks into :func:`train`; override the ones you need (all default to doing nothing).

    Order per step: loss, backward, ``before_step`` (gradients are there to edit), gradient
    clipping, ``optimizer.step()``, scheduler step, ``on_step``.
    """

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def before_step(self, state: TrainState) -> None:
        pass

    def on_step(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


@dataclass
class TrainResult:
    """Per-epoch ``history`` (``epoch``, ``train_loss``, ``lr``, ``val_accuracy``, ``val_nll``), wall ``seconds``."""

    history: list[dict[str, float]]
    seconds: float
    steps: int
    stopped: bool = False

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's record (empty when no epoch ran)."""
        return self.history[-1] if self.history else {}


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default loss: cross-entropy of ``model(x)`` against ``y`` for a batch ``(x, y)``."""
    return F.cross_entropy(model(batch[0]), batch[1])


def train(
    model: nn.Module,
    data: Splits | Dataset,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: OptimizerArg = "adam",
    weight_decay: float = 0.0,
    schedule: ScheduleArg = "constant",
    loss: LossFn | None = None,
    backward: BackwardFn | None = None,
    param_groups: Sequence[Any] | None = None,
    callbacks: Iterable[Callback] = (),
    device: str | torch.device = "cpu",
    eval_every_epoch: bool = True,
    max_grad_norm: float | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (a Splits' train split, or a Dataset) for ``epochs``.

    - ``seed`` fixes shuffling and every random op inside (dropout); the caller's global
      RNG is restored afterwards. Same seed, data and code give identical weights on CPU.
    - ``optimizer``: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum 0.9) or ``f(params) -> Optimizer``
      (then ``lr`` and ``weight_decay`` are the factory's business).
    - ``schedule``: per-step ``"constant"``, ``"cosine"`` (to 0), ``"onecycle"`` or
      ``f(optimizer, total_steps) -> LRScheduler``.
    - ``loss(model, batch) -> Tensor`` replaces cross-entropy on ``(x, y)`` batches.
    - ``backward(output) -> objective`` replaces ``output.backward()``: it receives whatever
      ``loss`` returned (e.g. the K task losses, or ``(losses, present)``), must fill the
      gradients and return the combined objective it back-propagated (a scalar tensor or a
      float). A loss fusion trains through it::

          fusion = get_loss_fusion("uncertainty")(num_tasks=2)
          train(model, data, loss=task_losses, backward=fusion.backward,
                param_groups=[*model.parameters(), *fusion.parameters()], ...)

      The logged loss (``TrainState.loss``, history ``train_loss``) is always the float of the
      combined objective: ``loss``'s output by default, ``backward``'s return value otherwise.
    - ``param_groups``: what the optimizer updates (parameters or dicts with their own
      ``lr``); parameters left out stay frozen. Default: every parameter that requires grad.
    - With a Splits, val accuracy/NLL are recorded each epoch unless ``eval_every_epoch=False``.

    In-memory TensorDatasets are batched by seeded permutation; other datasets by a
    DataLoader with a seeded generator. A last batch of a single sample is dropped
    (BatchNorm cannot train on one sample). The model's train/eval mode is restored.
    """
    if isinstance(data, Splits):
        train_set, val_set = data.train, data.val
    else:
        train_set, val_set = data, None
    if int(epochs) < 0 or int(batch_size) < 1:
        raise ConfigError(
            f"epochs must be >= 0 and batch_size >= 1; found epochs={epochs}, batch_size={batch_size}"
        )
    if len(train_set) == 0:
        raise ConfigError("train() got an empty training set")
    dev = torch.device(device)
    model.to(dev)
    groups = (
        list(param_groups) if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    )
    if not groups:
        raise ConfigError(
            "train() has no parameters to optimise: every parameter is frozen or param_groups is empty"
        )
    opt = make_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay)
    params = [p for g in opt.param_groups for p in g["params"]]
    batches = _Batches(train_set, int(batch_size), seed, num_workers)
    total_steps = int(epochs) * len(batches)
    scheduler = make_schedule(schedule, opt, total_steps)
    loss_fn = loss if loss is not None else cross_entropy
    callbacks = list(callbacks)
    was_training = model.training
    state = TrainState(model=model, optimizer=opt, scheduler=scheduler, total_steps=total_steps)
    start = time.perf_counter()
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=cuda),
            progress_bar("train", total=total_steps, show=progress) as bar,
        ):
            _seed_forked(seed, cuda)
            _call(callbacks, "on_train_begin", state)
            for epoch in range(int(epochs)):
                state.epoch = epoch
                model.train()
                seen, loss_sum = 0, 0.0
                for batch in batches.epoch():
                    batch = _to_device(batch, dev)
                    model.zero_grad(set_to_none=True)
                    opt.zero_grad(set_to_none=True)
                    value = loss_fn(model, batch)
                    state.loss, state.batch = _backward(value, backward), batch
                    _call(callbacks, "before_step", state)
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    opt.step()
                    if scheduler is not None:
                        scheduler.step()
                    state.step += 1
                    n = _batch_len(batch)
                    seen, loss_sum = seen + n, loss_sum + state.loss * n
                    _call(callbacks, "on_step", state)
                    bar.advance()
                    if state.stop:
                        break
                record: dict[str, float] = {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / max(seen, 1),
                    "lr": float(opt.param_groups[0]["lr"]),
                }
                if val_set is not None and eval_every_epoch and len(val_set) > 0:
                    metrics = evaluate(model, val_set, device=dev)
                    record["val_accuracy"], record["val_nll"] = metrics["accuracy"], metrics["nll"]
                state.history.append(record)
                bar.update(info=_summary(record))
                _call(callbacks, "on_epoch_end", state)
                if state.stop:
                    break
            _call(callbacks, "on_train_end", state)
    finally:
        model.train(was_training)
    return TrainResult(
        history=state.history, seconds=time.perf_counter() - start, steps=state.step, stopped=state.stop
    )


def make_optimizer(
    optimizer: OptimizerArg, groups: Sequence[Any], *, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """An optimizer by name (``adam``, ``adamw``, ``sgd`` with momentum 0.9) or from a factory."""
    if callable(optimizer):
        return optimizer(groups)
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(
        f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)} or a callable(params)"
    )


def make_schedule(schedule: ScheduleArg, opt: torch.optim.Optimizer, total_steps: int) -> Any:
    """A per-step learning-rate scheduler by name or from a factory; None for a constant rate."""
    if callable(schedule):
        return schedule(opt, total_steps)
    if schedule in (None, "constant"):
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total_steps, 1)
        )
    raise ConfigError(
        f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)} or a callable(optimizer, total_steps)"
    )


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: str | torch.device | None = None
) -> torch.Tensor:
    """Logits of ``model`` on every item of ``dataset``, in order, on the CPU (eval mode, no grad)."""
    return _run(model, dataset, batch_size, device)[0]


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: str | torch.device | None = None
) -> dict[str, float]:
    """Accuracy, mean negative log-likelihood (nats) and count ``n`` of ``model`` on ``(x, y)`` items."""
    logits, labels = _run(model, dataset, batch_size, device)
    n = len(labels)
    if n == 0:
        return {"accuracy": math.nan, "nll": math.nan, "n": 0}
    return {**accuracy_nll(logits, labels.long()), "n": n}


def _run(
    model: nn.Module, dataset: Dataset, batch_size: int, device: str | torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for batch in _ordered_batches(dataset, batch_size):
            outs.append(model(batch[0].to(dev)).cpu())
            if len(batch) > 1:
                labels.append(torch.as_tensor(batch[1]).cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(outs) if outs else torch.empty(0)
    return logits, (torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def _ordered_batches(dataset: Dataset, batch_size: int) -> Iterator[Batch]:
    if isinstance(dataset, TensorDataset):
        n = len(dataset)
        for i in range(0, n, batch_size):
            yield tuple(t[i : i + batch_size] for t in dataset.tensors)
    else:
        yield from (tuple(b) for b in DataLoader(dataset, batch_size=batch_size, shuffle=False))


class _Batches:
    """Seeded shuffled batches: index permutations for TensorDatasets, else a seeded DataLoader."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(int(seed))
        n = len(dataset)
        self.drop_last = n > batch_size and n % batch_size == 1
        self.loader = None
        if not isinstance(dataset, TensorDataset):
            self.loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=True,
                generator=self.generator,
                num_workers=num_workers,
                drop_last=self.drop_last,
            )

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self) -> Iterator[Batch]:
        if self.loader is not None:
            yield from (tuple(b) for b in self.loader)
            return
        tensors = self.dataset.tensors  # type: ignore[attr-defined]
        perm = torch.randperm(len(self.dataset), generator=self.generator)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            yield tuple(t[idx] for t in tensors)


def _backward(value: Any, backward: BackwardFn | None) -> float:
    """Back-propagate one step's loss output; the float of the combined objective, for logging."""
    if backward is None:
        value.backward()
        return float(value.detach())
    combined = backward(value)
    if isinstance(combined, torch.Tensor) and combined.numel() == 1:
        return float(combined.detach())
    if isinstance(combined, (int, float)) and not isinstance(combined, bool):
        return float(combined)
    found = tuple(combined.shape) if isinstance(combined, torch.Tensor) else type(combined).__name__
    raise ConfigError(
        f"train(backward=...) must return the combined objective it back-propagated (a scalar tensor or "
        f"a float, logged as the training loss), found {found}; e.g. LossFusion.backward returns it"
    )


def _seed_forked(seed: int, cuda: list[int]) -> None:
    """Seed only the generators fork_rng saved (CPU and ``cuda``), unlike torch.manual_seed, which seeds all."""
    torch.default_generator.manual_seed(int(seed))
    for index in cuda:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(int(seed))


def _to_device(batch: Batch, dev: torch.device) -> Batch:
    return tuple(b.to(dev, non_blocking=True) if isinstance(b, torch.Tensor) else b for b in batch)


def _batch_len(batch: Batch) -> int:
    first = batch[0] if batch else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim > 0 else 1


def _call(callbacks: list[Callback], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def _summary(record: dict[str, float]) -> str:
    text = f"loss {record['train_loss']:.3f}"
    if "val_accuracy" in record:
        text += f"  val acc {record['val_accuracy']:.3f}"
    return text
