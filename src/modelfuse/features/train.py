"""Training a :class:`FeatureFusion` through the one training loop, with feature caching."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from modelfuse.data.splits import Splits
from modelfuse.errors import ConfigError
from modelfuse.features.cache import (
    CachedHead,
    CachedRows,
    cache_features,
    cached_cross_entropy,
    evaluate_cached,
)
from modelfuse.features.model import FeatureFusion
from modelfuse.zoo.train import Callback, TrainResult, TrainState, evaluate, train

#: train() keywords fit_feature_fusion sets itself
_OWN = frozenset(
    {"epochs", "seed", "lr", "batch_size", "device", "callbacks", "loss", "param_groups", "eval_every_epoch"}
)
_PASSED = tuple(
    n for n, p in inspect.signature(train).parameters.items() if p.kind is p.KEYWORD_ONLY and n not in _OWN
)


@dataclass
class FeatureFusionFit:
    """What :func:`fit_feature_fusion` did: the trained ``model`` (the one given, trained in place),
    the loop's ``result`` (``history`` per epoch, with ``val_accuracy``/``val_nll`` given a Splits),
    whether features were ``cached`` and the seconds spent computing the cache."""

    model: FeatureFusion
    result: TrainResult
    cached: bool
    cache_seconds: float = 0.0

    @property
    def history(self) -> list[dict[str, float]]:
        return self.result.history


class _Validate(Callback):
    """Adds ``val_accuracy`` and ``val_nll`` to each epoch's record."""

    def __init__(self, metrics: Callable[[], dict[str, float]]) -> None:
        self.metrics = metrics

    def on_epoch_end(self, state: TrainState) -> None:
        m = self.metrics()
        state.history[-1].update(val_accuracy=m["accuracy"], val_nll=m["nll"])


def _input_shape(train_set: Dataset, data: Splits | Dataset) -> tuple[int, ...]:
    if isinstance(data, Splits):
        return tuple(data.input_shape)
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ConfigError("fit_feature_fusion got an empty training set")
    return tuple(torch.as_tensor(train_set[0][0]).shape)


def fit_feature_fusion(
    model: FeatureFusion,
    data: Splits | Dataset,
    *,
    epochs: int,
    seed: int,
    cache: bool | str = "auto",
    lr: float = 1e-3,
    batch_size: int = 64,
    cache_batch_size: int | None = None,
    device: str | torch.device = "cpu",
    callbacks: Iterable[Callback] = (),
    **train_options: Any,
) -> FeatureFusionFit:
    """Train ``model`` in place on ``data`` (a Splits' train split, or a Dataset of ``(x, y)``) with
    :func:`modelfuse.zoo.train.train` and its per-branch ``param_groups(lr)``.

    ``cache``: ``"auto"`` caches when every branch is frozen, ``True`` insists (an error otherwise),
    ``False`` recomputes the backbones every step. Cached training computes each branch's prepared
    features once (:func:`cache_features`) and trains :class:`CachedHead` on them: the same batches in
    the same order as without caching, so the same seed gives the same head; ``cache_batch_size``
    (default: ``batch_size``) batches that pass. With a Splits, each
    epoch's record gets ``val_accuracy`` and ``val_nll``. ``train_options`` go to ``train`` (optimizer,
    weight_decay, schedule, max_grad_norm, progress, ...); callbacks see the module being trained
    (a :class:`CachedHead` when cached).
    """
    if cache not in ("auto", True, False):
        raise ConfigError(f"cache must be 'auto', True or False, found {cache!r}")
    unknown = sorted(set(train_options) - set(_PASSED))
    if unknown:
        raise ConfigError(
            f"fit_feature_fusion got unknown option(s) {', '.join(unknown)}; it passes on to train(): "
            f"{', '.join(_PASSED)}"
        )
    if not isinstance(model, FeatureFusion):
        raise ConfigError(f"fit_feature_fusion trains a FeatureFusion, found {type(model).__name__}")
    if cache is True and not model.all_frozen:
        moving = [n for n, b in model.branch_specs.items() if b.policy != "frozen"]
        raise ConfigError(
            f"cache=True needs every branch frozen; {', '.join(map(repr, moving))} train(s). "
            "Use cache='auto' or False, or freeze them"
        )
    cached = model.all_frozen if cache == "auto" else bool(cache)
    train_set, val_set = (data.train, data.val) if isinstance(data, Splits) else (data, None)
    if not model.built:
        model.build(_input_shape(train_set, data))
    dev = torch.device(device)
    model.to(dev)
    cache_seconds = 0.0
    if cached:
        start = time.perf_counter()
        train_features = cache_features(
            model, train_set, batch_size=cache_batch_size or batch_size, device=dev
        )
        val_features = (
            cache_features(model, val_set, batch_size=cache_batch_size or batch_size, device=dev)
            if val_set is not None and len(val_set) > 0  # type: ignore[arg-type]
            else None
        )
        cache_seconds = time.perf_counter() - start
        head = CachedHead(model)
        checks: list[Callback] = []
        if val_features is not None:
            checks.append(_Validate(lambda: evaluate_cached(head, val_features, device=dev)))
        # batched the way train() batches the original data: by permutation or by a seeded DataLoader
        rows = train_features if isinstance(train_set, TensorDataset) else CachedRows(train_features)
        target, loss = head, cached_cross_entropy
    else:
        checks = []
        if val_set is not None and len(val_set) > 0:  # type: ignore[arg-type]
            checks.append(_Validate(lambda: evaluate(model, val_set, device=dev)))
        target, rows, loss = model, train_set, None
    result = train(
        target,
        rows,
        epochs=epochs,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        device=dev,
        loss=loss,
        param_groups=model.param_groups(lr),
        callbacks=[*checks, *callbacks],
        **train_options,
    )
    return FeatureFusionFit(model=model, result=result, cached=cached, cache_seconds=cache_seconds)
