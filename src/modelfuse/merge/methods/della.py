"""DELLA: drop task-vector entries with a keep probability that grows with their magnitude rank."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from modelfuse.merge.methods._base import Density, PerModel, merge_method
from modelfuse.merge.methods._engine import gta_merge
from modelfuse.merge.methods._random import model_seeds
from modelfuse.merge.methods._sparsifiers import (
    KeepAll,
    RankKeep,
    Rescale,
    Sparsifier,
    check_della_range,
)
from modelfuse.merge.methods.dare import RANDOM_MASK_NOTE

PAPER = (
    "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling, MagPrune: rank-based drop probabilities p_i, survivors rescaled by 1/(1 - p_i)"
)


#: DELLA's per-model spread of the keep probabilities around the density
Epsilon = Annotated[float, Field(ge=0, lt=1)]


def _probabilities_in_range(model: Any) -> None:
    """One model's density and epsilon together (a per-model schema check)."""
    try:
        check_della_range(model.density, model.epsilon)
    except Exception as exc:  # pydantic wants ValueError; the message names both fields
        raise ValueError(str(exc)) from None


def _prunes(
    base: torch.Tensor,
    density: list[float],
    epsilon: list[float],
    rescale: str,
    generator: torch.Generator | None,
) -> list[Sparsifier]:
    seeds = model_seeds(generator, [d < 1 for d in density], base.device)
    return [
        KeepAll() if d >= 1 else RankKeep(d, e, rescale, s, base.shape)
        for d, e, s in zip(density, epsilon, seeds)
    ]


@merge_method(
    "della", base="required", paper=PAPER, check_model=_probabilities_in_range,
    mergekit=(
        "base: required, not an input. Rank probabilities and L1 rescale as mergekit; "
    ) + RANDOM_MASK_NOTE,
)
def della(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    epsilon: PerModel[Epsilon] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: Rescale = "l1",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA: MagPrune each task vector, then TIES' vote and mean: y = base + lambda sum m_i u_i / D.

    Paper (Deep, Bhardwaj, Poria 2024): within each row rank the delta
    magnitudes, give larger ones smaller drop probabilities around the mean drop rate,
    drop, rescale survivors by 1/(1 - p_i); then elect signs and fuse (TIES).
    mergekit (the default): per row (a 1-D tensor is one row; more dims: along dim 1) rank
    r of |tau| (1..n; equal values ranked by position, a stable sort), keep probability
    p = (d - eps) + 2 eps (r - 1) / (n - 1); kept where u < p, u the draws of DARE
    (``_random.uniforms`` of a seed each model with d < 1 draws from ``generator`` in
    model order; positions in flat order), then the L1
    rescale (``rescale="l1"``; the paper's per-entry 1/p is ``"inverse_density"``).
    Requires 0 < d - eps and d + eps < 1 whenever d < 1 (density 1 keeps everything).
    Vote on u_i = w_i pruned_i, m_i = [sign(u_i) == s], D = sum_i m_i w_i (0 becomes 1).
    """
    parts = _prunes(base, density, epsilon, rescale, generator)
    return gta_merge(xs, base, parts, weight, elect=True, normalize=normalize, lambda_=lambda_)


@merge_method(
    "della_linear", base="required", paper=PAPER, check_model=_probabilities_in_range,
    mergekit=(
        "base: required, not an input. Rank probabilities and L1 rescale as mergekit; "
    ) + RANDOM_MASK_NOTE,
)
def della_linear(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    epsilon: PerModel[Epsilon] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "l1",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA's MagPrune without the vote: y = base + lambda * sum_i w_i pruned_i.

    Pruning and rescale as in ``della``; no division by default (mergekit),
    ``normalize=True`` divides by sum_i w_i.
    """
    parts = _prunes(base, density, epsilon, rescale, generator)
    return gta_merge(xs, base, parts, weight, elect=False, normalize=normalize, lambda_=lambda_)
