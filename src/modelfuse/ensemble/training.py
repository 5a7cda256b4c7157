"""Training ensembles: bagging, snapshot ensembles, fast geometric ensembling and SWA.

Every method trains through the one loop :func:`modelfuse.zoo.train.train`; what makes a
method is a learning-rate ``schedule=`` factory and a :class:`~modelfuse.zoo.train.Callback`
that collects members (or averages weights) at the right steps. All are seeded (the same
seed gives the same weights) and leave the caller's global RNG untouched.

A model is given as a zoo architecture name (built for the data's input shape and number
of classes, with ``model_kwargs``), a zero-argument factory, or a module; names and
factories are built under the seed, a module is deep-copied and never changed.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from modelfuse.data.splits import Splits
from modelfuse.ensemble.module import Ensemble
from modelfuse.errors import ConfigError
from modelfuse.zoo.registry import create_model
from modelfuse.zoo.train import (
    Callback,
    OptimizerArg,
    ScheduleArg,
    TrainResult,
    TrainState,
    make_schedule,
    train,
)

ModelArg = str | nn.Module | Callable[[], nn.Module]
ScheduleFactory = Callable[[torch.optim.Optimizer, int], Any]

_TRAIN_KEYWORDS = frozenset(
    n for n, p in inspect.signature(train).parameters.items() if p.kind is p.KEYWORD_ONLY
)


@dataclass
class TrainedEnsemble:
    """The ``members`` a training method produced, in the order they were made.

    ``steps``: the optimizer step (counted from 1 within the run that made it) at which
    each member was taken; ``indices``: bagging's bootstrap indices into the training split,
    one row per member (None for the other methods); ``results``: the :class:`TrainResult`
    of every :func:`train` call made (for FGE the pre-training run comes first).
    """

    members: list[nn.Module]
    steps: list[int]
    results: list[TrainResult]
    indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.members)

    def __getitem__(self, i: int) -> nn.Module:
        return self.members[i]

    def ensemble(
        self, combine: str = "mean_prob", weights: Sequence[float] | torch.Tensor | None = None
    ) -> Ensemble:
        """An :class:`Ensemble` over the members (shared, not copied; the Ensemble freezes them)."""
        return Ensemble(self.members, combine=combine, weights=weights)


class Snapshots(Callback):
    """Collects a deep copy of the model (eval mode, no gradients) after every step where ``when`` holds.

    ``when(step, total_steps)`` gets the 1-based number of the step just taken. The copies
    land in ``members`` and their step numbers in ``steps``.
    """

    def __init__(self, when: Callable[[int, int], bool]) -> None:
        self.when = when
        self.members: list[nn.Module] = []
        self.steps: list[int] = []

    def on_step(self, state: TrainState) -> None:
        if self.when(state.step, state.total_steps):
            self.members.append(_frozen_copy(state.model))
            self.steps.append(state.step)


class WeightAverager(Callback):
    """SWA's running average of the weights (``torch.optim.swa_utils.AveragedModel``).

    The average is updated at the end of every epoch after the first ``start_epoch`` ones
    (epochs ``start_epoch + 1 .. epochs``, counted from 1); ``epochs`` lists those epochs.
    """

    def __init__(self, start_epoch: int) -> None:
        self.start_epoch = int(start_epoch)
        self.averaged: AveragedModel | None = None
        self.epochs: list[int] = []

    def on_train_begin(self, state: TrainState) -> None:
        self.averaged = AveragedModel(state.model)

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch + 1 > self.start_epoch and self.averaged is not None:
            self.averaged.update_parameters(state.model)
            self.epochs.append(state.epoch + 1)

    def model(self) -> nn.Module:
        """The averaged network (the ``AveragedModel``'s module, its BatchNorm statistics not yet updated)."""
        if self.averaged is None:
            raise ConfigError("WeightAverager has averaged nothing yet: use it as a callback of train()")
        return self.averaged.module


def snapshot_lr(step: int, total_steps: int, cycles: int, lr0: float) -> float:
    """Snapshot ensembles' cyclic cosine rate at 1-based ``step`` (Huang et al. 2017, eq. 2):
    ``lr0 / 2 * (cos(pi * mod(step - 1, ceil(T / M)) / ceil(T / M)) + 1)``."""
    length = math.ceil(total_steps / cycles)
    return lr0 / 2 * (math.cos(math.pi * ((step - 1) % length) / length) + 1)


def fge_lr(step: int, cycle_steps: int, alpha1: float, alpha2: float) -> float:
    """FGE's cyclic piecewise-linear rate at 1-based ``step`` (Garipov et al. 2018, eq. 2):
    with ``t = (mod(step - 1, c) + 1) / c``, ``(1 - 2t) a1 + 2t a2`` for ``t <= 1/2`` and
    ``(2 - 2t) a2 + (2t - 1) a1`` after, so the rate is ``a2`` at mid-cycle and ``a1`` at its end."""
    t = ((step - 1) % cycle_steps + 1) / cycle_steps
    if t <= 0.5:
        return (1 - 2 * t) * alpha1 + 2 * t * alpha2
    return (2 - 2 * t) * alpha2 + (2 * t - 1) * alpha1


def snapshot_schedule(cycles: int) -> ScheduleFactory:
    """A ``schedule=`` factory for :func:`train`: :func:`snapshot_lr` as a ``LambdaLR`` over the run.

    The rate restarts at the optimizer's ``lr`` every ``ceil(T / cycles)`` steps of the
    ``T`` steps. Raises ConfigError when ``cycles`` does not give exactly that many cycles.
    """
    cycles = _positive_int(cycles, "cycles")

    def factory(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        length = _cycle_length(total_steps, cycles)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (math.cos(math.pi * (s % length) / length) + 1)
        )

    return factory


def fge_schedule(cycle_steps: int, alpha1: float, alpha2: float) -> ScheduleFactory:
    """A ``schedule=`` factory for :func:`train`: :func:`fge_lr` as a ``LambdaLR``.

    The optimizer's ``lr`` must be ``alpha1`` (the factor is ``fge_lr / alpha1``).
    Raises ConfigError when the run is too short to reach one mid-cycle minimum.
    """
    c, a1, a2 = _check_fge(cycle_steps, alpha1, alpha2)

    def factory(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        if total_steps < c // 2:
            raise ConfigError(
                f"FGE phase has {total_steps} steps, fewer than the {c // 2} needed to reach the first "
                f"learning-rate minimum (cycle_steps={c}); train more epochs or shorten the cycle"
            )
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: fge_lr(s + 1, c, a1, a2) / a1)

    return factory


def bootstrap_indices(n: int, k: int, *, seed: int) -> torch.Tensor:
    """``k`` bootstrap resamples of ``range(n)``: a (k, n) int64 tensor drawn with replacement.

    Drawn by NumPy's ``default_rng(seed)``, so the same seed gives the same indices and
    the caller's torch and NumPy global RNGs are untouched.
    """
    if int(n) < 1:
        raise ConfigError(f"cannot resample an empty training set (n={n})")
    rng = np.random.default_rng(int(seed))
    return torch.from_numpy(rng.integers(0, int(n), size=(int(k), int(n)))).long()


def bagging(
    model: ModelArg,
    data: Splits | Dataset,
    *,
    k: int,
    epochs: int,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    **train_kwargs: Any,
) -> TrainedEnsemble:
    """Bootstrap aggregating (Breiman 1996): ``k`` members, member ``i`` trained on a bootstrap
    resample (``n`` draws with replacement, :func:`bootstrap_indices`) of the training split.

    Member ``i`` is built and trained with seed ``seed + i``; the resamples come from
    ``seed``. ``train_kwargs`` go to :func:`train` (``lr``, ``optimizer``, ``batch_size``, ...).
    """
    k = _positive_int(k, "k (members)")
    _check_kwargs(train_kwargs, "bagging", reserved=("epochs", "seed"))
    train_set = data.train if isinstance(data, Splits) else data
    indices = bootstrap_indices(len(train_set), k, seed=seed)
    members, steps, results = [], [], []
    for i in range(k):
        resample = _take(train_set, indices[i])
        member_data = replace(data, train=resample) if isinstance(data, Splits) else resample
        net = build_model(model, data, seed=seed + i, model_kwargs=model_kwargs)
        result = train(net, member_data, epochs=epochs, seed=seed + i, **train_kwargs)
        members.append(net.eval())
        steps.append(result.steps)
        results.append(result)
    return TrainedEnsemble(members=members, steps=steps, results=results, indices=indices)


def snapshot_ensemble(
    model: ModelArg,
    data: Splits | Dataset,
    *,
    cycles: int,
    epochs: int,
    seed: int = 0,
    lr: float = 0.1,
    optimizer: OptimizerArg = "sgd",
    model_kwargs: Mapping[str, Any] | None = None,
    **train_kwargs: Any,
) -> TrainedEnsemble:
    """Snapshot ensembles (Huang et al. 2017): one run with cyclic cosine annealing,
    ``lr_t = lr0 / 2 (cos(pi mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)`` (their eq. 2, ``M = cycles``
    over the ``T`` steps of ``epochs`` epochs), and a snapshot of the weights at the end of
    each cycle as one member; the last member is the final model.

    Defaults follow the paper (SGD with momentum 0.9, ``lr0 = 0.1``).
    """
    _check_kwargs(train_kwargs, "snapshot_ensemble", reserved=("epochs", "seed", "schedule"))
    cycles = _positive_int(cycles, "cycles")
    net = build_model(model, data, seed=seed, model_kwargs=model_kwargs)
    snaps = Snapshots(lambda step, total: step % math.ceil(total / cycles) == 0 or step == total)
    callbacks = [snaps, *train_kwargs.pop("callbacks", ())]
    result = train(
        net,
        data,
        epochs=epochs,
        seed=seed,
        lr=lr,
        optimizer=optimizer,
        schedule=snapshot_schedule(cycles),
        callbacks=callbacks,
        **train_kwargs,
    )
    return TrainedEnsemble(members=snaps.members, steps=snaps.steps, results=[result])


def fast_geometric_ensemble(
    model: ModelArg,
    data: Splits | Dataset,
    *,
    epochs: int,
    cycle_steps: int,
    alpha1: float = 0.05,
    alpha2: float = 0.0005,
    pretrain_epochs: int = 0,
    pretrain_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    optimizer: OptimizerArg = "sgd",
    model_kwargs: Mapping[str, Any] | None = None,
    **train_kwargs: Any,
) -> TrainedEnsemble:
    """Fast geometric ensembling (Garipov et al. 2018): from a pre-trained model, ``epochs``
    more epochs with the cyclic piecewise-linear rate of their eq. 2 (:func:`fge_lr`, from
    ``alpha1`` down to ``alpha2`` at mid-cycle and back over ``cycle_steps`` steps, an even
    number), collecting a member after each step taken at the minimum ``alpha2``.

    ``pretrain_epochs`` > 0 first trains the model with ``pretrain_kwargs`` (to :func:`train`,
    seed ``seed``); pass a trained module and 0 to start from it. The FGE phase uses seed
    ``seed + 1``, ``optimizer`` (SGD with momentum 0.9, as in the paper) at ``lr = alpha1``.
    """
    _check_kwargs(train_kwargs, "fast_geometric_ensemble", reserved=("epochs", "seed", "schedule", "lr"))
    c, a1, a2 = _check_fge(cycle_steps, alpha1, alpha2)
    if int(pretrain_epochs) < 0:
        raise ConfigError(f"pretrain_epochs must be >= 0, found {pretrain_epochs}")
    if int(epochs) < 1:
        raise ConfigError(f"FGE needs epochs >= 1 for its cyclic phase, found {epochs}")
    net = build_model(model, data, seed=seed, model_kwargs=model_kwargs)
    results = []
    if int(pretrain_epochs) > 0:
        pre = dict(pretrain_kwargs or {})
        _check_kwargs(pre, "fast_geometric_ensemble pretrain_kwargs", reserved=("epochs", "seed"))
        results.append(train(net, data, epochs=int(pretrain_epochs), seed=seed, **pre))
    snaps = Snapshots(lambda step, total: step % c == c // 2)
    callbacks = [snaps, *train_kwargs.pop("callbacks", ())]
    results.append(
        train(
            net,
            data,
            epochs=epochs,
            seed=seed + 1,
            lr=a1,
            optimizer=optimizer,
            schedule=fge_schedule(c, a1, a2),
            callbacks=callbacks,
            **train_kwargs,
        )
    )
    return TrainedEnsemble(members=snaps.members, steps=snaps.steps, results=results)


class SWASchedule:
    """SWA's rate: ``base`` schedule for the first ``start_steps`` steps, then ``SWALR`` annealing
    to ``swa_lr`` over ``anneal_steps`` steps and holding it (stepped per step, as :func:`train` does)."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        *,
        start_steps: int,
        swa_lr: float,
        anneal_steps: int,
        anneal_strategy: str,
        base: ScheduleArg,
    ) -> None:
        self.optimizer = opt
        self.start_steps = int(start_steps)
        self.swa_lr, self.anneal_steps, self.anneal_strategy = swa_lr, int(anneal_steps), anneal_strategy
        self.base = make_schedule(base, opt, self.start_steps) if self.start_steps > 0 else None
        self.swa: SWALR | None = self._swalr() if self.start_steps == 0 else None
        self.count = 0

    def _swalr(self) -> SWALR:
        return SWALR(
            self.optimizer,
            swa_lr=self.swa_lr,
            anneal_epochs=self.anneal_steps,
            anneal_strategy=self.anneal_strategy,  # type: ignore[arg-type]
        )

    def step(self) -> None:
        self.count += 1
        if self.count < self.start_steps:
            if self.base is not None:
                self.base.step()
        elif self.swa is None:
            self.swa = self._swalr()
        else:
            self.swa.step()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


def swa(
    model: ModelArg,
    data: Splits | Dataset,
    *,
    epochs: int,
    swa_start: int,
    swa_lr: float = 0.01,
    lr: float = 0.05,
    optimizer: OptimizerArg = "sgd",
    schedule: ScheduleArg = "constant",
    anneal_epochs: int = 0,
    anneal_strategy: str = "cos",
    bn_batch_size: int = 256,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    **train_kwargs: Any,
) -> nn.Module:
    """Stochastic weight averaging (Izmailov et al. 2018): train ``epochs`` epochs, the first
    ``swa_start`` with ``lr`` and ``schedule``, the rest with ``SWALR`` (annealing to ``swa_lr``
    over ``anneal_epochs``, then constant), and average the weights at the end of each epoch
    after ``swa_start`` (their Algorithm 1: ``w_SWA <- (w_SWA n + w) / (n + 1)``, by
    ``torch.optim.swa_utils.AveragedModel``).

    BatchNorm statistics of the average are then recomputed over the training split by
    ``update_bn`` (batches of ``bn_batch_size``, each weighing equally). Returns the averaged
    model in eval mode.
    """
    _check_kwargs(train_kwargs, "swa", reserved=("epochs", "seed", "schedule"))
    epochs = _positive_int(epochs, "epochs")
    if not 0 <= int(swa_start) < epochs:
        raise ConfigError(
            f"swa_start={swa_start} must lie in [0, epochs) so that at least one epoch is averaged; "
            f"epochs={epochs}"
        )
    if anneal_strategy not in ("cos", "linear"):
        raise ConfigError(f"anneal_strategy must be 'cos' or 'linear', found {anneal_strategy!r}")
    if int(anneal_epochs) < 0 or float(swa_lr) <= 0:
        raise ConfigError(f"need anneal_epochs >= 0 and swa_lr > 0; found {anneal_epochs} and {swa_lr}")
    bn_batch_size = _positive_int(bn_batch_size, "bn_batch_size")
    net = build_model(model, data, seed=seed, model_kwargs=model_kwargs)

    def factory(opt: torch.optim.Optimizer, total_steps: int) -> SWASchedule:
        per_epoch = total_steps // epochs
        return SWASchedule(
            opt,
            start_steps=int(swa_start) * per_epoch,
            swa_lr=float(swa_lr),
            anneal_steps=int(anneal_epochs) * per_epoch,
            anneal_strategy=anneal_strategy,
            base=schedule,
        )

    averager = WeightAverager(int(swa_start))
    callbacks = [averager, *train_kwargs.pop("callbacks", ())]
    train(
        net,
        data,
        epochs=epochs,
        seed=seed,
        lr=lr,
        optimizer=optimizer,
        schedule=factory,
        callbacks=callbacks,
        **train_kwargs,
    )
    averaged = averager.model()
    train_set = data.train if isinstance(data, Splits) else data
    device = next(iter(averaged.parameters()), torch.empty(0)).device
    with torch.random.fork_rng(devices=[]):  # dropout in train-mode forward passes
        torch.default_generator.manual_seed(int(seed))
        update_bn(DataLoader(train_set, batch_size=bn_batch_size, shuffle=False), averaged, device=device)
    return averaged.eval()


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without gradients, in eval mode."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    return clone.eval()


def build_model(
    model: ModelArg, data: Splits | Dataset, *, seed: int, model_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A fresh model: a copy of a module, or a zoo name / factory built with ``seed`` (global RNG untouched)."""
    if isinstance(model, nn.Module):
        if model_kwargs:
            raise ConfigError("model_kwargs apply to a zoo architecture name, not to a module")
        return copy.deepcopy(model)
    if isinstance(model, str):
        if not isinstance(data, Splits):
            raise ConfigError(
                f"building {model!r} by name needs a Splits (for input_shape and num_classes); "
                "pass a Splits or a module"
            )
        built: Any
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            built = create_model(
                model, input_shape=data.input_shape, num_classes=data.num_classes, **(model_kwargs or {})
            )
        return built
    if callable(model):
        if model_kwargs:
            raise ConfigError("model_kwargs apply to a zoo architecture name, not to a model factory")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            built = model()
        if not isinstance(built, nn.Module):
            raise ConfigError(f"the model factory returned a {type(built).__name__}, not a torch.nn.Module")
        return built
    raise ConfigError(
        f"model must be a zoo architecture name, a torch.nn.Module or a factory; found {type(model).__name__}"
    )


def _take(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """Rows ``indices`` of ``dataset`` (repeats allowed): a TensorDataset stays one."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise ConfigError(f"{name} must be a positive integer, found {value!r}")
    return int(value)


def _cycle_length(total_steps: int, cycles: int) -> int:
    """``ceil(T / M)``, checking that the run of ``T`` steps splits into exactly ``M`` cycles."""
    if cycles > total_steps:
        raise ConfigError(
            f"cycles={cycles} is more than the {total_steps} optimizer steps of the run; "
            "use fewer cycles or more epochs"
        )
    length = math.ceil(total_steps / cycles)
    actual = math.ceil(total_steps / length)
    if actual != cycles:
        raise ConfigError(
            f"{total_steps} steps in cycles of ceil({total_steps}/{cycles}) = {length} steps make only "
            f"{actual} cycles, not {cycles}; pick a number of cycles that divides the run more evenly "
            f"(e.g. {actual}) or change epochs"
        )
    return length


def _check_fge(cycle_steps: Any, alpha1: float, alpha2: float) -> tuple[int, float, float]:
    if (
        isinstance(cycle_steps, bool)
        or not isinstance(cycle_steps, int | np.integer)
        or int(cycle_steps) < 2
        or int(cycle_steps) % 2
    ):
        raise ConfigError(
            f"FGE cycle_steps must be a positive even integer (the minimum is at mid-cycle); found {cycle_steps!r}"
        )
    a1, a2 = float(alpha1), float(alpha2)
    if not (a1 > 0 and 0 <= a2 <= a1):
        raise ConfigError(f"FGE needs alpha1 > 0 and 0 <= alpha2 <= alpha1; found alpha1={a1}, alpha2={a2}")
    return int(cycle_steps), a1, a2


def _check_kwargs(kwargs: Mapping[str, Any], where: str, reserved: Sequence[str]) -> None:
    """ConfigError for keywords :func:`train` does not know, or that the method sets itself."""
    taken = sorted(set(kwargs) & set(reserved))
    if taken:
        raise ConfigError(
            f"{where} sets {', '.join(taken)} itself; leave {'it' if len(taken) == 1 else 'them'} out"
        )
    unknown = sorted(set(kwargs) - _TRAIN_KEYWORDS)
    if unknown:
        raise ConfigError(
            f"{where} got unknown training options {unknown}; valid: {', '.join(sorted(_TRAIN_KEYWORDS))}"
        )


__all__ = [
    "ModelArg",
    "SWASchedule",
    "Snapshots",
    "TrainedEnsemble",
    "WeightAverager",
    "bagging",
    "bootstrap_indices",
    "build_model",
    "fast_geometric_ensemble",
    "fge_lr",
    "fge_schedule",
    "snapshot_ensemble",
    "snapshot_lr",
    "swa",
]
