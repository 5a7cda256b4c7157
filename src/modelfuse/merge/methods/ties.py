"""TIES-Merging: trim task vectors, elect a sign per entry, average those that agree."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods._base import Density, PerModel, merge_method
from modelfuse.merge.methods._engine import gta_merge
from modelfuse.merge.methods._sparsifiers import (
    KeepAll,
    Rescale,
    Sparsifier,
    Threshold,
    TieBreak,
    TopK,
)

#: how tie_break relates to mergekit's bytes (quoted by ties and breadcrumbs in --list-methods and model cards)
TIE_BREAK_NOTE = (
    "tie_break: index (the default) orders equal magnitudes at the cut by position, as "
    "mergekit does on a GPU; mergekit's CPU bytes differ there (about 1e-5 of entries on the "
    "measured Llama-style recipe): set tie_break: sort to get them bit for bit"
)


@merge_method(
    "ties",
    base="required",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, Algorithm 1 "
    "(trim, elect sign, disjoint merge)",
    mergekit=(
        "base: required, not an input. Bit-equal with tie_break: sort; "
    ) + TIE_BREAK_NOTE + (
        ". Not in mergekit: vote, trim, threshold and the rescale modes l2/linf/inverse_density"
    ),
)
def ties(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    threshold: PerModel[Annotated[float | None, Field(ge=0)]] = None,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: Rescale = "none",
    vote: Literal["weighted", "unweighted"] = "weighted",
    trim: Literal["tensor", "global"] = "tensor",
    tie_break: TieBreak = "index",
) -> torch.Tensor:
    """TIES: y = base + lambda * sum_i m_i u_i / sum_i m_i w_i over trimmed, sign-agreeing deltas.

    Paper (Yadav, Tam, Choshen, Raffel, Bansal 2023, Algorithm 1): trim each task vector
    to its top-k% magnitudes (tau_hat_t), elect gamma = sgn(sum_t tau_hat_t), take the
    disjoint mean over the t whose sign agrees, theta = theta_init + lambda tau_m.

    Defaults are mergekit's (``vote="weighted"``, ``trim="tensor"``): per tensor keep the
    k_i = max(1, floor(d_i n)) largest |tau_i| (float32 magnitudes; of equal magnitudes at the
    cut the first by position stay, ``tie_break="index"``, as mergekit on a GPU; ``"sort"``
    orders them as torch's CPU ``argsort`` does, mergekit's CPU output bit for bit), u_i = w_i trimmed
    tau_i, s = +1 where sum_i u_i >= 0 else -1, m_i = [sign(u_i) == s] (zeros never count),
    D = sum_i m_i w_i (0 becomes 1), in the base dtype. ``normalize=False`` skips the
    division. ``rescale`` (mergekit's, off by default) rescales the trimmed vector.

    The paper's variant: ``vote="unweighted"`` elects on sum_i trimmed tau_i and counts
    m_i = [sign(trimmed tau_i) == s] (with all weights 1 this is the paper's disjoint mean);
    ``trim="global"`` trims over the whole task vector, which one tensor cannot see: the
    executor computes each model's magnitude cut over all of its tensors and passes it as
    the per-model ``threshold``; entries with |tau| >= threshold stay (``density`` is then
    only the fraction the threshold was computed for). ``threshold`` is required with
    ``trim="global"`` and refused otherwise.
    """
    given = [t is not None for t in threshold]
    if trim == "global":
        if not all(given):
            raise ConfigError(
                "ties with trim: global needs each model's magnitude threshold over its whole task "
                "vector (per-model 'threshold', computed by the executor); found none for model(s) "
                f"{[i for i, g in enumerate(given) if not g]}"
            )
        parts: list[Sparsifier] = [Threshold(t, d, rescale) for t, d in zip(threshold, density)]
    else:
        if any(given):
            raise ConfigError(
                "ties: per-model 'threshold' is only used with trim: global; remove it or set trim: global"
            )
        parts = [KeepAll() if d >= 1 else TopK(d, rescale, tie_break) for d in density]
    return gta_merge(
        xs,
        base,
        parts,
        weight,
        elect=True,
        normalize=normalize,
        lambda_=lambda_,
        unweighted_vote=vote == "unweighted",
    )
