"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models").

- :func:`uniform_soup`: the plain average of the ingredients' weights (eq. "uniform soup").
- :func:`greedy_soup`: ingredients sorted by held-out accuracy, best first; each is added
  to the soup only if the soup's held-out accuracy does not drop (Wortsman et al., Recipe 1).
  The held-out split is one the user names (default ``"val"``); the test split is refused
  unless ``allow_test=True``, so the soup is never selected on the data it is reported on.

Every accuracy goes through :func:`modelfuse.zoo.evaluate`.
:func:`weighted_state` is shared with AdaMerging; the shape check lives in the basement
(:func:`modelfuse.io.states.check_same_shapes`, also used by the loss-barrier tool).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from modelfuse.data.splits import SPLITS, Splits
from modelfuse.errors import ConfigError
from modelfuse.io.states import check_same_shapes
from modelfuse.zoo.train import evaluate

__all__ = [
    "SoupResult",
    "SoupStep",
    "check_same_shapes",
    "greedy_soup",
    "held_out",
    "uniform_soup",
    "weighted_state",
]


def held_out(
    data: Splits | Dataset, split: str, *, allow_test: bool = False, what: str = "this method"
) -> Dataset:
    """The dataset of ``split`` in ``data`` (a :class:`Splits`), or ``data`` itself when it is a Dataset.

    ``split="test"`` is refused unless ``allow_test=True``: selecting or learning on the
    test split makes any test figure afterwards meaningless.
    """
    if split not in SPLITS:
        raise ConfigError(f"{what}: split must be one of {', '.join(SPLITS)}; found {split!r}")
    if split == "test" and not allow_test:
        raise ConfigError(
            f"{what} was pointed at the test split; it selects or learns on this data, so test figures "
            "would no longer be honest. Use split='val' (or another held-out split), or pass "
            "allow_test=True if this is really meant"
        )
    dataset = getattr(data, split) if isinstance(data, Splits) else data
    if len(dataset) == 0:
        raise ConfigError(f"{what}: the {split!r} split is empty; name a split with data")
    return dataset


def weighted_state(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_i w_i state_i for floating-point tensors (computed in float64, stored in each tensor's dtype);
    integer tensors (BatchNorm's ``num_batches_tracked``) are taken from the first state."""
    if len(states) != len(weights) or not states:
        raise ConfigError(f"{len(weights)} weights for {len(states)} states; give one weight per state")
    out: dict[str, torch.Tensor] = {}
    for k, v in states[0].items():
        if not torch.is_floating_point(v):
            out[k] = v.clone()
            continue
        acc = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
        for w, sd in zip(weights, states):
            acc.add_(sd[k].to(torch.float64), alpha=float(w))
        out[k] = acc.to(v.dtype)
    return out


def _with_state(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def uniform_soup(models: Sequence[nn.Module]) -> nn.Module:
    """A new module (a copy of the first) holding the mean of the models' weights and float buffers."""
    models = list(models)
    states = check_same_shapes(models)
    return _with_state(models[0], weighted_state(states, [1.0 / len(states)] * len(states)))


@dataclass
class SoupStep:
    """One candidate of the greedy soup: its index among the inputs, its own held-out accuracy,
    the soup's accuracy with it, whether it was kept, and the soup's accuracy after the step."""

    index: int
    ingredient_accuracy: float
    candidate_accuracy: float
    kept: bool
    soup_accuracy: float


@dataclass
class SoupResult:
    """The greedy soup: the ``model``, the ``kept`` input indices (in the order added), the per-step record
    and every ingredient's own held-out ``accuracies`` (by input index), measured on ``split``."""

    model: nn.Module
    kept: list[int]
    steps: list[SoupStep]
    accuracies: list[float]
    split: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """The final soup's held-out accuracy."""
        return self.steps[-1].soup_accuracy


def greedy_soup(
    models: Sequence[nn.Module],
    data: Splits | Dataset,
    *,
    split: str = "val",
    allow_test: bool = False,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> SoupResult:
    """Greedy soup: sort by held-out accuracy, add each ingredient only if held-out accuracy does not drop.

    ``data`` is a :class:`Splits` (``split`` picks the held-out set, default ``"val"``; ``"test"``
    needs ``allow_test=True``) or a Dataset of ``(x, y)`` items used as is. Ties in accuracy
    keep the input order; a candidate whose soup ties the current accuracy is kept (the paper's
    "does not drop"). The soup's held-out accuracy is never below the best ingredient's, which
    is where it starts.
    """
    models = list(models)
    states = check_same_shapes(models)
    dataset = held_out(data, split, allow_test=allow_test, what="greedy_soup")

    def acc(model: nn.Module) -> float:
        return float(evaluate(model, dataset, batch_size=batch_size, device=device)["accuracy"])

    accuracies = [acc(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -accuracies[i])
    kept = [order[0]]
    soup = _with_state(models[order[0]], states[order[0]])
    best = accuracies[order[0]]
    steps = [SoupStep(order[0], best, best, True, best)]
    for i in order[1:]:
        members = [*kept, i]
        candidate = _with_state(
            models[0], weighted_state([states[j] for j in members], [1.0 / len(members)] * len(members))
        )
        cand_acc = acc(candidate)
        keep = cand_acc >= best
        if keep:
            kept, soup, best = members, candidate, cand_acc
        steps.append(SoupStep(i, accuracies[i], cand_acc, keep, best))
    return SoupResult(model=soup, kept=kept, steps=steps, accuracies=accuracies, split=split)
