"""DARE: drop task-vector entries at random and rescale the rest (with or without TIES' vote)."""

from __future__ import annotations

import torch

from modelfuse.merge.methods._base import Density, PerModel, merge_method
from modelfuse.merge.methods._engine import gta_merge
from modelfuse.merge.methods._random import model_seeds
from modelfuse.merge.methods._sparsifiers import KeepAll, RandomKeep, Rescale, Sparsifier

PAPER = (
    "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
    "as a Free Lunch, DARE: m ~ Bernoulli(p), tau' = (1 - m) * tau / (1 - p)"
)

#: how the random masks relate to mergekit's (quoted in --list-methods and model cards)
RANDOM_MASK_NOTE = (
    "random masks come from modelfuse's seeded SplitMix64 stream, not torch's bernoulli: "
    "equal to mergekit's in distribution, bit-equal only at density 1"
)


def _drops(
    base: torch.Tensor, density: list[float], rescale: str, generator: torch.Generator | None
) -> list[Sparsifier]:
    seeds = model_seeds(generator, [d < 1 for d in density], base.device)
    return [KeepAll() if d >= 1 else RandomKeep(d, rescale, s) for d, s in zip(density, seeds)]


@merge_method(
    "dare_linear", base="required", paper=PAPER,
    mergekit=(
        "base: required, not an input. L1 rescale as mergekit; "
    ) + RANDOM_MASK_NOTE,
)
def dare_linear(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "l1",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE then task arithmetic: y = base + lambda * sum_i w_i dropped_i (``normalize``: / sum_i w_i).

    Paper (Yu, Yu, Yu, Huang, Li 2024): drop each delta entry with probability p and
    rescale the survivors by 1/(1 - p): ``rescale="inverse_density"`` (density = 1 - p).
    mergekit (the default): keep with probability d_i, then match the L1 norm of the
    original task vector, dropped * ||tau_i||_1 / ||dropped||_1 (skipped when either norm
    is below 1e-7), ``rescale="l1"`` (mergekit's ``rescale: true``; ``false`` is ``none``).
    Masks: each model with d_i < 1 draws a seed s_i from ``generator`` (seeded per tensor by
    the executor) in model order, and keeps entry j (flat order) when u_j < d_i, u_j the
    j-th output of SplitMix64 seeded s_i on the 2^-24 grid of [0, 1)
    (``_random.uniforms``: a counter-based stream, the same on every device and code
    path); density 1 draws nothing. Masks and rescale run in float32 (float64 for float64).
    """
    parts = _drops(base, density, rescale, generator)
    return gta_merge(xs, base, parts, weight, elect=False, normalize=normalize, lambda_=lambda_)


@merge_method(
    "dare_ties", base="required", paper=PAPER,
    mergekit=(
        "base: required, not an input. L1 rescale and weighted vote as mergekit; "
    ) + RANDOM_MASK_NOTE,
)
def dare_ties(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "l1",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drops, then TIES' sign election: y = base + lambda * sum_i m_i w_i dropped_i.

    The drop and rescale are those of ``dare_linear`` (mergekit's L1 rescale by default,
    the paper's 1/density with ``rescale="inverse_density"``); the vote is TIES' on the
    weighted dropped deltas u_i: s = +1 where sum_i u_i >= 0 else -1, m_i = [sign(u_i) == s].
    As in mergekit there is no division by default; ``normalize=True`` divides by
    sum_i m_i w_i (0 becomes 1).
    """
    parts = _drops(base, density, rescale, generator)
    return gta_merge(xs, base, parts, weight, elect=True, normalize=normalize, lambda_=lambda_)
