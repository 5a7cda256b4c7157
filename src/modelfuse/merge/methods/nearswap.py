"""NearSwap: take the other model's value where it is already near the base model's."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods._base import merge_method


@merge_method(
    "nearswap",
    base="required",
    min_models=1,
    max_models=1,
    paper="alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (model card): "
    "w = clamp(t / |base - x|, 0, 1), y = w x + (1 - w) base",
    mergekit=(
        "base: required, not an input. Same formula (the difference floored at 1e-6): bit-equal"
    ),
)
def nearswap(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    t: Annotated[float, Field(gt=0.0, description="the sameness threshold, in weight units")],
) -> torch.Tensor:
    """Per element, move from the base towards the other model the more, the closer they are.

    NearSwap (alchemonaut 2024, model card of QuartetAnemoi-70B-t0.0001):
    w = clamp(t / max(|base - x|, 1e-6), 0, 1) and y = w x + (1 - w) base, so elements that
    differ by at most t are taken from x, and ones that differ by d > t move t/d of the way.

    mergekit semantics (0.1.5's source): t must be > 0; the difference is floored at 1e-6
    (earlier mergekit divided by the raw difference and mapped inf/nan to 1, which differs
    only where |base - x| < 1e-6 and t < 1e-6). Computed elementwise in the base tensor's
    dtype, as mergekit does.
    """
    x = xs[0].to(base.dtype)
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * x + (1 - w) * base
