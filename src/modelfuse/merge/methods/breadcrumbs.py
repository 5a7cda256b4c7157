"""Model Breadcrumbs: keep the mid-range magnitudes of each task vector, dropping both tails."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods._base import Density, PerModel, merge_method
from modelfuse.merge.methods._engine import gta_merge
from modelfuse.merge.methods._sparsifiers import KeepAll, Rescale, Sparsifier, TieBreak, Window
from modelfuse.merge.methods.ties import TIE_BREAK_NOTE

PAPER = (
    "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
    "masked task vectors theta = theta_0 + alpha sum_t m_t * tau_t"
)


#: breadcrumbs' per-model fraction of the largest magnitudes removed
Gamma = Annotated[float, Field(ge=0, le=1)]


def _crumbs(density: list[float], gamma: list[float], rescale: str, tie_break: str) -> list[Sparsifier]:
    return [KeepAll() if d >= 1 else Window(d, g, rescale, tie_break) for d, g in zip(density, gamma)]


@merge_method(
    "breadcrumbs", base="required", paper=PAPER,
    mergekit=(
        "base: required, not an input. Bit-equal with tie_break: sort; "
    ) + TIE_BREAK_NOTE,
)
def breadcrumbs(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "none",
    tie_break: TieBreak = "index",
) -> torch.Tensor:
    """Breadcrumbs: y = base + lambda * sum_i w_i crumbs_i (``normalize``: / sum_i w_i).

    Paper (Davari & Belilovsky 2024): per layer, mask out the largest-magnitude entries
    (outliers) and the smallest ones, add the masked task vectors scaled by alpha (lambda).
    mergekit's per-tensor mask (this one): sort |tau_i| (float32) ascending (equal magnitudes
    by position, ``tie_break="index"``, as mergekit on a GPU; ``"sort"``: as torch's CPU
    ``torch.sort`` orders them, mergekit's CPU output bit for bit); n_top = floor(gamma n), target = floor(d n), n_bot = max(0, n - target
    - n_top); keep sorted positions [n_bot, n_bot + target). So the top fraction removed is
    gamma, shrunk when gamma + d > 1 so that d is always what stays; density 1 keeps all.
    No rescale and no division by default. (mergekit before 0.1.5 sliced the sorted
    positions as ``[n_bot:-n_top]``, which keeps nothing when n_top = 0, i.e. gamma n < 1;
    0.1.5 and this follow the formula above.)
    """
    parts = _crumbs(density, gamma, rescale, tie_break)
    return gta_merge(xs, base, parts, weight, elect=False, normalize=normalize, lambda_=lambda_)


@merge_method(
    "breadcrumbs_ties",
    base="required",
    paper=PAPER + "; with TIES' sign election (Yadav et al. 2023)",
    mergekit=(
        "base: required, not an input. Bit-equal with tie_break: sort; "
    ) + TIE_BREAK_NOTE,
)
def breadcrumbs_ties(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "none",
    tie_break: TieBreak = "index",
) -> torch.Tensor:
    """Breadcrumbs masks, then TIES' sign election: y = base + lambda * sum_i m_i w_i crumbs_i.

    The masks are ``breadcrumbs``'; u_i = w_i crumbs_i, s = +1 where sum_i u_i >= 0 else
    -1, m_i = [sign(u_i) == s]. No division by default (mergekit); ``normalize=True``
    divides by sum_i m_i w_i (0 becomes 1).
    """
    parts = _crumbs(density, gamma, rescale, tie_break)
    return gta_merge(xs, base, parts, weight, elect=True, normalize=normalize, lambda_=lambda_)
