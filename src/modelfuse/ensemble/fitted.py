"""Combiners fitted on cached member predictions (compute each member's outputs on the
validation set once; fitting then takes milliseconds).

Both follow scikit-learn's estimator conventions: the constructor only stores settings,
``fit(outputs, labels)`` validates and learns, fitted state ends in ``_``.
``outputs`` are the members' logits stacked as (K, N, classes) (``Ensemble.member_outputs``),
``labels`` (N,) class indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from modelfuse.ensemble.module import Ensemble
from modelfuse.errors import ConfigError
from modelfuse.zoo.metrics import check_logits_labels


def member_log_probs(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs of a fit: the members' log-probabilities (K, N, classes) in float64 and
    the labels (N,) as int64; errors say what is wrong with either."""
    outputs, labels = check_logits_labels(
        outputs, labels, what="the members' validation logits", stacked=True, min_samples=1, finite=True
    )
    return torch.log_softmax(outputs.detach().cpu().double(), dim=-1), labels.cpu()


def label_log_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's log-probability of each sample's label, (K, N), from (K, N, classes)."""
    return log_probs.gather(2, labels.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)).squeeze(2)


def mixture_nll(picked: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """NLL of the weighted mean of probabilities, -mean_n log sum_k w_k p_k(y_n | x_n), from
    the label log-probabilities (K, N) and log w (K,)."""
    return -torch.logsumexp(picked + log_weights.view(-1, 1), dim=0).mean()


class TemperatureScaling:
    """One temperature T for a classifier's scores, minimising the validation NLL of
    softmax(z / T) (Guo et al. 2017, "On calibration of modern neural networks", Sec. 4.2).

    ``fit(scores, labels)`` takes (N, classes) logits or log-probabilities (an ensemble's
    output); T is fitted in log space by L-BFGS from T = 1, in float64. T > 1 softens
    over-confident predictions; the argmax, hence the accuracy, never changes.
    """

    def __init__(self, max_iter: int = 100) -> None:
        self.max_iter = max_iter

    def fit(self, scores: torch.Tensor, labels: torch.Tensor) -> TemperatureScaling:
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise ConfigError(
                "temperature scaling expects scores of shape (samples, classes), found "
                f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
            )
        log_probs, labels = member_log_probs(scores.unsqueeze(0), labels)
        z = log_probs[0]  # log_softmax leaves softmax(z / T) unchanged for every T
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [log_t], max_iter=self.max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12
        )

        def loss() -> torch.Tensor:
            opt.zero_grad()
            value = torch.nn.functional.cross_entropy(z / log_t.exp(), labels)
            value.backward()
            return value

        self.start_nll_ = loss().item()
        opt.step(loss)
        t = float(log_t.detach().exp())
        final = torch.nn.functional.cross_entropy(z / t, labels).item()
        if not math.isfinite(final) or final > self.start_nll_:
            t, final = 1.0, self.start_nll_
        self.temperature_ = t
        self.nll_ = final
        return self

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probabilities log_softmax(scores / T)."""
        return torch.log_softmax(scores / self.temperature_, dim=-1)


class LearnedWeights:
    """Member weights that minimise the validation NLL of the weighted mean of probabilities.

    The weights are a softmax of free parameters, so they stay non-negative and sum to one;
    fitted by L-BFGS from equal weights (``max_iter`` iterations at most), in float64.
    With ``temperature=True`` a temperature for the weighted ensemble is fitted afterwards
    (``TemperatureScaling``); ``temperature_`` is 1 otherwise. ``nll_`` is the fitted
    ensemble's validation NLL, ``start_nll_`` the plain mean's.
    """

    def __init__(self, max_iter: int = 200, temperature: bool = False) -> None:
        self.max_iter = max_iter
        self.temperature = temperature

    def fit(self, outputs: torch.Tensor, labels: torch.Tensor) -> LearnedWeights:
        log_probs, labels = member_log_probs(outputs, labels)
        picked = label_log_probs(log_probs, labels)
        k = picked.shape[0]
        free = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [free], max_iter=self.max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12
        )

        def loss() -> torch.Tensor:
            opt.zero_grad()
            value = mixture_nll(picked, torch.log_softmax(free, 0))
            value.backward()
            return value

        start = loss().item()
        opt.step(loss)
        weights = torch.softmax(free.detach(), 0)
        final = mixture_nll(picked, torch.log(weights)).item()
        if final > start:  # L-BFGS moved away: keep equal weights
            weights, final = torch.full((k,), 1.0 / k, dtype=torch.float64), start
        self.temperature_ = 1.0
        if self.temperature:
            combined = torch.logsumexp(log_probs + torch.log(weights).view(-1, 1, 1), dim=0)
            scaling = TemperatureScaling().fit(combined, labels)
            self.temperature_, final = scaling.temperature_, scaling.nll_
        self.weights_ = weights
        self.nll_ = final
        self.start_nll_ = start
        return self

    def ensemble(self, members: Sequence[nn.Module]) -> Ensemble:
        """An ``Ensemble`` of ``members`` with the fitted weights (and temperature)."""
        return Ensemble(members, "mean_prob", self.weights_, temperature=self.temperature_)


class GreedySelection:
    """Ensemble selection (Caruana et al. 2004): start empty and repeatedly add, with
    replacement, the member whose addition gives the lowest validation NLL of the mean of
    probabilities, for at most ``steps`` additions; stop early when no addition lowers it.
    ``weights_``: how often each member was picked, over the number of picks;
    ``trajectory_``: the validation NLL after each pick (non-increasing by construction);
    ``picks_``: the members in the order picked."""

    def __init__(self, steps: int = 50) -> None:
        if steps < 1:
            raise ConfigError(f"greedy selection needs at least one step, found steps={steps}")
        self.steps = steps

    def fit(self, outputs: torch.Tensor, labels: torch.Tensor) -> GreedySelection:
        picked = label_log_probs(
            *member_log_probs(outputs, labels)
        ).exp()  # (K, N): each member's probability of the label
        k, n = picked.shape
        total = torch.zeros(n, dtype=torch.float64)  # sum of the picked members' label probabilities
        picks: list[int] = []
        trajectory: list[float] = []
        for step in range(self.steps):
            candidates = -torch.log((total + picked) / (step + 1)).mean(1)  # NLL after adding each member
            best = int(torch.argmin(candidates))  # the lowest index on ties
            if trajectory and candidates[best].item() >= trajectory[-1]:
                break
            picks.append(best)
            total += picked[best]
            trajectory.append(candidates[best].item())
        counts = torch.bincount(torch.tensor(picks), minlength=k).double()
        self.picks_ = picks
        self.trajectory_ = trajectory
        self.weights_ = counts / counts.sum()
        return self

    def ensemble(self, members: Sequence[nn.Module]) -> Ensemble:
        """An ``Ensemble`` of ``members`` with the selection's weights (mean of probabilities)."""
        return Ensemble(members, "mean_prob", self.weights_)
