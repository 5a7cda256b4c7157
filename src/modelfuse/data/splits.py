"""Train/val/test splits of one dataset, and the seeded stratified index arithmetic behind them."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from modelfuse.errors import ConfigError, DataError

#: a split name, for type annotations and pydantic schemas
SplitName = Literal["train", "val", "test"]
#: the split names every Splits has, in order
SPLITS: tuple[str, ...] = get_args(SplitName)


@dataclass
class Splits:
    """Train, validation and test sets of one dataset, plus what determined them.

    ``spec`` is a JSON-serialisable record of everything that produced the splits (dataset
    name and options, subsets taken); caches key trained models on it. Labels are never
    remapped, so a model trained on a subset keeps the full ``num_classes`` outputs.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    spec: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None

    def subset(
        self,
        labels: Iterable[int] | None = None,
        fraction: float | None = None,
        seed: int = 0,
    ) -> Splits:
        """A task: train and val restricted to ``labels``; train thinned to a seeded ``fraction``.

        ``labels`` keeps only those classes in train and val; ``fraction`` keeps a seeded,
        stratified share of the (label-restricted) train split, for low-data tasks. The test
        split stays complete so every task is evaluated on the same, full test set. The
        subset is appended to ``spec["subsets"]``.
        """
        if labels is None and fraction is None:
            return replace(self, spec=copy.deepcopy(self.spec))
        label_list = None
        train, val = self.train, self.val
        if labels is not None:
            label_list = sorted({int(c) for c in labels})
            bad = [c for c in label_list if not 0 <= c < self.num_classes]
            if not label_list or bad:
                raise ConfigError(
                    f"subset labels must be a non-empty set of classes in [0, {self.num_classes}); found {bad or '[]'}"
                )
            train = _take(train, _label_indices(labels_of(train), label_list))
            val = _take(val, _label_indices(labels_of(val), label_list))
        if fraction is not None:
            fraction = float(fraction)
            if not 0.0 < fraction <= 1.0:
                raise ConfigError(f"subset fraction must be in (0, 1]; found {fraction}")
            keep = stratified_fraction(labels_of(train), fraction, seed)
            train = _take(train, keep)
        if len(train) == 0:
            raise DataError(f"subset of {self.name!r} (labels={label_list}, fraction={fraction}) is empty")
        spec = copy.deepcopy(self.spec)
        spec.setdefault("subsets", []).append({"labels": label_list, "fraction": fraction, "seed": int(seed)})
        return replace(self, train=train, val=val, spec=spec)

    def __repr__(self) -> str:
        return (
            f"Splits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The integer labels of a dataset, read without loading inputs where possible."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _label_indices(labels: torch.Tensor, keep: Sequence[int]) -> np.ndarray:
    mask = torch.isin(labels, torch.as_tensor(list(keep), dtype=labels.dtype))
    return mask.nonzero().flatten().numpy()


def _take(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """Rows ``indices`` of a dataset: a new TensorDataset for in-memory data, else a Subset."""
    index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[index] for t in dataset.tensors))
    return Subset(dataset, index.tolist())


def stratified_split(labels: Any, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into parts of the given fractions (summing to 1), stratified by label, seeded.

    Each class is shuffled and its members spread evenly over [0, 1]; all samples are
    merged in that order and the sequence is cut at the cumulative fractions. Part sizes
    are exact (``round(f * n)`` cumulatively), each part's class counts are within one of
    proportional, and even tiny classes do not starve the small parts. Indices come back sorted.
    """
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ConfigError(f"split fractions must be non-negative and sum to 1; found {list(fractions)}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    position = np.zeros(n)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        position[idx[rng.permutation(len(idx))]] = (np.arange(len(idx)) + 0.5) / len(idx)
    order = np.lexsort((rng.random(n), position))  # ties between classes broken at random
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    return [np.sort(order[bounds[p] : bounds[p + 1]]) for p in range(len(fractions))]


def stratified_fraction(labels: Any, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified ``fraction`` of the indices, at least one per class present."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[rng.permutation(len(idx))[:n]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=int)


def tensor_splits(
    name: str,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    parts: Sequence[np.ndarray],
    *,
    num_classes: int,
    spec: dict[str, Any],
    classes: list[str] | None = None,
) -> Splits:
    """In-memory :class:`Splits` from arrays and three index arrays (train, val, test)."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    sets = [
        TensorDataset(xt[torch.as_tensor(p, dtype=torch.long)], yt[torch.as_tensor(p, dtype=torch.long)])
        for p in parts
    ]
    return Splits(
        name=name,
        train=sets[0],
        val=sets[1],
        test=sets[2],
        num_classes=num_classes,
        input_shape=tuple(xt.shape[1:]),
        spec=spec,
        classes=classes,
    )
