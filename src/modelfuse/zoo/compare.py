"""Does model A really beat model B? A paired comparison on the same test samples.

Two models evaluated on the same samples differ only where they disagree, so their accuracies
are compared sample by sample: the mean of (A right) - (B right) with a paired bootstrap
interval (Efron & Tibshirani 1993, percentile method), and the same for the per-sample NLL.
On a few hundred test samples a difference of a fraction of a point is usually inside the
interval: a tie, not a win.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modelfuse.errors import ConfigError
from modelfuse.zoo.metrics import check_logits_labels, nll

#: resampled means computed per block (draws x samples stay below this many indices)
_BLOCK = 4_000_000


@dataclass(frozen=True)
class PairedComparison:
    """Model A minus model B on ``n`` shared samples.

    ``accuracy_difference``: A's accuracy minus B's (a share, not points); ``nll_difference``: A's
    mean NLL minus B's (negative: A is better; NaN where either gives a label probability 0).
    Each has a ``level`` bootstrap interval. ``only_a`` / ``only_b``: samples only A / only B
    classifies right (the disagreements that decide).
    """

    n: int
    accuracy_difference: float
    accuracy_interval: tuple[float, float]
    nll_difference: float
    nll_interval: tuple[float, float]
    only_a: int
    only_b: int
    level: float
    draws: int

    @property
    def accuracy_significant(self) -> bool:
        """Whether the accuracy interval excludes 0 (one model is better at ``level``)."""
        low, high = self.accuracy_interval
        return low > 0 or high < 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_interval"] = list(self.accuracy_interval)
        d["nll_interval"] = list(self.nll_interval)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairedComparison:
        """The comparison back from :meth:`as_dict` (other keys are ignored)."""
        values = {f.name: d[f.name] for f in fields(cls)}
        values["accuracy_interval"] = tuple(values["accuracy_interval"])
        values["nll_interval"] = tuple(values["nll_interval"])
        return cls(**values)

    def describe(self, a: str = "A", b: str = "B") -> str:
        low, high = self.accuracy_interval
        pct = round(100 * self.level)
        nll = (
            f", NLL {self.nll_difference:+.4f} ({self.nll_interval[0]:+.4f} to {self.nll_interval[1]:+.4f})"
            if math.isfinite(self.nll_difference)
            else ", NLL not comparable (a label probability of 0)"
        )
        verdict = "" if self.accuracy_significant else "; in accuracy a tie: the interval includes 0"
        return (
            f"{a} - {b}: {100 * self.accuracy_difference:+.2f} accuracy points ({pct}% paired bootstrap "
            f"interval {100 * low:+.2f} to {100 * high:+.2f}; right only {a}: {self.only_a}, only {b}: "
            f"{self.only_b} of {self.n}){nll}{verdict}"
        )


def _checked(logits: Mapping[str, Any], labels: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The named logits as float64 (N, C) tensors of one shape, and the labels as int64 (N,)."""
    tensors, y = [], None
    for name, value in logits.items():
        t, y = check_logits_labels(value, labels, what=name, min_samples=1)
        tensors.append(t.double())
    names = list(logits)
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != tensors[0].shape:
            raise ConfigError(
                f"{names[0]} and {name} differ in shape: {tuple(tensors[0].shape)} against {tuple(t.shape)}"
            )
    return tensors, y


def compare_predictions(
    logits_a: Any,
    logits_b: Any,
    labels: Any,
    *,
    level: float = 0.95,
    draws: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two models' ``(N, C)`` logits on the same ``N`` samples with integer ``labels``.

    One seeded bootstrap resamples the samples ``draws`` times; both differences use the same
    resamples, so the intervals are paired. Same inputs and seed give the same result.
    """
    if not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; found {level}")
    if int(draws) < 1:
        raise ConfigError(f"draws must be a positive number of bootstrap resamples; found {draws}")
    (a, b), y = _checked({"logits_a": logits_a, "logits_b": logits_b}, labels)
    right_a, right_b = (a.argmax(1) == y).numpy(), (b.argmax(1) == y).numpy()
    d_right = right_a.astype(np.float64) - right_b
    d_nll = (F.cross_entropy(a, y, reduction="none") - F.cross_entropy(b, y, reduction="none")).numpy()
    n, draws = len(d_right), int(draws)
    rng = np.random.default_rng(seed)
    # a model that gives some label probability 0 (e.g. a vote) has an infinite NLL: not compared
    nll_finite = bool(np.isfinite(d_nll).all())
    means_right, means_nll = np.empty(draws), np.full(draws, math.nan)
    block = max(1, _BLOCK // n)
    for start in range(0, draws, block):
        stop = min(draws, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means_right[start:stop] = d_right[idx].mean(1)
        if nll_finite:
            means_nll[start:stop] = d_nll[idx].mean(1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    lr, hr = np.percentile(means_right, q)
    ln, hn = np.percentile(means_nll, q) if nll_finite else (math.nan, math.nan)
    nll_difference = float(d_nll.mean()) if nll_finite else math.nan
    return PairedComparison(
        n=n,
        accuracy_difference=float(d_right.mean()),
        accuracy_interval=(float(lr), float(hr)),
        nll_difference=nll_difference,
        nll_interval=(float(ln), float(hn)),
        only_a=int((right_a & ~right_b).sum()),
        only_b=int((right_b & ~right_a).sum()),
        level=float(level),
        draws=draws,
    )


@dataclass(frozen=True)
class FusionRoom:
    """How much several models could add to the best of them, on ``n`` shared samples.

    ``best`` (index) / ``best_name``: the most accurate model (ties: the lower NLL);
    ``best_wrong``: samples it gets wrong; ``fixable``: those of them some other model gets
    right; ``oracle_accuracy``: the share of samples some model gets right (the accuracy of a
    combination that always picked a right model, an upper bound for fusing their predictions).
    """

    n: int
    names: tuple[str, ...]
    accuracies: tuple[float, ...]
    best: int
    best_wrong: int
    fixable: int
    oracle_accuracy: float

    @property
    def best_name(self) -> str:
        return self.names[self.best]

    def describe(self) -> str:
        best = self.best_name
        return (
            f"room for fusion: {best} is wrong on {self.best_wrong} of {self.n} samples and another model "
            f"is right on {self.fixable} of them (oracle accuracy {100 * self.oracle_accuracy:.2f}% against "
            f"{best}'s {100 * self.accuracies[self.best]:.2f}%)"
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["names"], d["accuracies"] = list(self.names), list(self.accuracies)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FusionRoom:
        """The room back from :meth:`as_dict` (other keys are ignored)."""
        values = {f.name: d[f.name] for f in fields(cls)}
        values["names"], values["accuracies"] = tuple(values["names"]), tuple(values["accuracies"])
        return cls(**values)


def room_for_fusion(logits: Any, labels: Any, names: Any = None) -> FusionRoom:
    """The most accurate of several models' ``(N, C)`` logits on the same ``N`` samples, and how
    many of its errors the others get right (see :class:`FusionRoom`).

    ``logits``: a sequence of ``(N, C)`` logits, or a ``(K, N, C)`` tensor; ``names``: one per
    model (default ``model 0``, ``model 1``, ...). Few fixable samples mean that no fusion of
    these models can gain much over the best one.
    """
    models = list(logits)
    if len(models) < 2:
        raise ConfigError(f"room_for_fusion needs at least 2 models' logits; found {len(models)}")
    names = [f"model {i}" for i in range(len(models))] if names is None else [str(n) for n in names]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ConfigError(
            f"room_for_fusion needs one distinct name per model; found {names} for {len(models)} models"
        )
    tensors, y = _checked(dict(zip(names, models)), labels)
    right = torch.stack([t.argmax(1) == y for t in tensors])  # (K, N)
    accuracies = right.double().mean(1)
    nlls = [nll(t, y) for t in tensors]
    best = min(range(len(tensors)), key=lambda i: (-float(accuracies[i]), nlls[i]))
    others = torch.cat([right[:best], right[best + 1 :]]).any(0)
    return FusionRoom(
        n=int(y.shape[0]),
        names=tuple(names),
        accuracies=tuple(float(a) for a in accuracies),
        best=best,
        best_wrong=int((~right[best]).sum()),
        fixable=int((~right[best] & others).sum()),
        oracle_accuracy=float(right.any(0).double().mean()),
    )
