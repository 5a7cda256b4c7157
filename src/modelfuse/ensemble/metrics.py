"""Metrics for members and ensembles: accuracy, NLL, Brier score, ECE, disagreement.

Inputs are log-probabilities (N, C) (what classification combiners return; for a model
that gives logits, ``torch.log_softmax(logits, -1)``) and integer labels (N,). ``accuracy``
and ``nll`` are those of :mod:`modelfuse.zoo.metrics` (which takes logits or log-probabilities),
and every input goes through its ``check_logits_labels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelfuse.errors import ConfigError
from modelfuse.zoo.metrics import accuracy, check_logits_labels, nll

__all__ = ["accuracy", "brier", "disagreement", "ece", "nll", "prediction_metrics"]


def _check(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return check_logits_labels(log_probs, labels, what="log-probabilities")[1]


def brier(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Brier score (Brier 1950): mean over rows of sum_c (p_c - [c = label])^2."""
    labels = _check(log_probs, labels)
    p = log_probs.double().exp()
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).double()
    return ((p - onehot) ** 2).sum(1).mean().item()


def ece(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): rows binned by their top probability
    into ``bins`` equal-width bins of (0, 1] (right-closed), then sum_b n_b / N |acc_b - conf_b|."""
    labels = _check(log_probs, labels)
    if bins < 1:
        raise ConfigError(f"ece needs at least one bin, found bins={bins}")
    p = log_probs.double().exp()
    conf, pred = p.max(1)
    hit = (pred == labels).double()
    which = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if n:
            total += n / len(conf) * abs(hit[inside].mean().item() - conf[inside].mean().item())
    return total


def disagreement(predictions: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """Mean over member pairs of the share of rows where their predicted classes differ
    (diversity; 0 for one member)."""
    preds = torch.stack(list(predictions)) if not isinstance(predictions, torch.Tensor) else predictions
    k = preds.shape[0]
    if k < 2:
        return 0.0
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            total += (preds[i] != preds[j]).double().mean().item()
    return total / (k * (k - 1) / 2)


def prediction_metrics(log_probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """accuracy, nll, brier and ece of one prediction."""
    return {
        "accuracy": accuracy(log_probs, labels),
        "nll": nll(log_probs, labels),
        "brier": brier(log_probs, labels),
        "ece": ece(log_probs, labels, bins),
    }
