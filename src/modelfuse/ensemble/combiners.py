"""Combiners: how an ensemble turns its members' outputs into one output.

A combiner is a function ``(outputs, weights) -> combined`` over the stacked outputs of K
members, ``outputs`` of shape (K, N, ...) and ``weights`` (K,) non-negative and summing to
one, registered by name with its task. Classification combiners take the members' logits
(last dim: classes) and return log-probabilities, so that ``argmax`` predicts and ``exp``
gives probabilities; regression combiners return values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelfuse.registry import Registry


@dataclass(frozen=True)
class Combiner:
    """A registered combiner: its function, task and whether member weights apply to it."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    task: str  # "classification" or "regression"
    weighted: bool = True


_COMBINERS: Registry[Combiner] = Registry("combiner")


def register_combiner(name: str, task: str, weighted: bool = True) -> Callable:
    def decorator(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
        _COMBINERS.register(name, Combiner(name, fn, task, weighted))
        return fn

    return decorator


def get_combiner(name: str) -> Combiner:
    """The combiner registered as ``name``; an unknown name raises RegistryError listing close names."""
    return _COMBINERS.get(name)


def list_combiners(pattern: str = "*") -> list[str]:
    """Registered combiner names matching a shell-style ``pattern``, sorted."""
    return _COMBINERS.names(pattern)


def _column(weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """The weights shaped (K, 1, ..., 1) to broadcast over ``outputs`` (K, N, ...)."""
    return weights.to(outputs.dtype).reshape(-1, *([1] * (outputs.dim() - 1)))


@register_combiner("mean_prob", "classification")
def mean_prob(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the members' probabilities (soft voting): log sum_k w_k softmax(z_k),
    computed as a logsumexp of log w_k + log_softmax(z_k)."""
    w = _column(weights, outputs)
    return torch.logsumexp(torch.log_softmax(outputs, dim=-1) + torch.log(w), dim=0)


@register_combiner("mean_logits", "classification")
def mean_logits(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the members' logits, then a softmax: log_softmax(sum_k w_k z_k)."""
    return torch.log_softmax((outputs * _column(weights, outputs)).sum(0), dim=-1)


@register_combiner("geometric_mean", "classification")
def geometric_mean(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Normalised weighted geometric mean of the probabilities (product of experts):
    log_softmax(sum_k w_k log_softmax(z_k))."""
    logp = torch.log_softmax(outputs, dim=-1)
    return torch.log_softmax((logp * _column(weights, outputs)).sum(0), dim=-1)


@register_combiner("vote", "classification")
def vote(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hard (weighted) majority vote: the log of each class's share of the votes, a member
    voting for its argmax with its weight. Ties go to the lowest class index (``argmax`` of
    the shares picks the first maximum), as in scikit-learn's VotingClassifier; classes
    without votes get log 0 = -inf."""
    classes = outputs.shape[-1]
    picks = torch.nn.functional.one_hot(outputs.argmax(-1), classes).to(outputs.dtype)
    shares = (picks * _column(weights, picks)).sum(0)
    return torch.log(shares)


@register_combiner("max_confidence", "classification", weighted=False)
def max_confidence(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per sample, the log-probabilities of the member most confident about its top class
    (the first such member on ties)."""
    logp = torch.log_softmax(outputs, dim=-1)
    best = logp.amax(-1).argmax(0)  # (N, ...): the most confident member
    return torch.gather(logp, 0, best.unsqueeze(0).unsqueeze(-1).expand(1, *logp.shape[1:])).squeeze(0)


@register_combiner("mean", "regression")
def mean(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the members' outputs: sum_k w_k y_k."""
    return (outputs * _column(weights, outputs)).sum(0)


@register_combiner("median", "regression")
def median(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted median of the members' outputs, element by element: the least value whose
    cumulative weight (members sorted by value) passes 1/2; where it reaches 1/2 exactly,
    the mean of that value and the next one with weight. With equal weights: NumPy's median (the mean of
    the two middle values for an even count)."""
    values, order = torch.sort(outputs, dim=0, stable=True)
    w = weights.to(outputs.dtype)[order.reshape(len(weights), -1)].reshape(order.shape)
    cum = torch.cumsum(w, dim=0)
    eps = 1e-9 if outputs.dtype == torch.float64 else 1e-6
    first = (
        (cum > 0.5 - eps).to(torch.int64).argmax(0, keepdim=True)
    )  # where the cumulative weight reaches 1/2
    after = (cum > 0.5 + eps).to(torch.int64).argmax(0, keepdim=True)  # the next value that carries weight
    at = torch.gather(values, 0, first)
    nxt = torch.gather(values, 0, after)
    exact = (torch.gather(cum, 0, first) - 0.5).abs() <= eps
    return torch.where(exact, (at + nxt) / 2, at).squeeze(0)
