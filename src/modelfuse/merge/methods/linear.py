"""Weighted averaging of weights: model soups and their kin."""

from __future__ import annotations

import torch

from modelfuse.merge.methods._base import Params, merge_method


class LinearShared(Params):
    normalize: bool = True


class Weight(Params):
    weight: float = 1.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float32, or float64 for float64 inputs (mergekit's rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@merge_method(
    "linear",
    shared=LinearShared,
    per_model=Weight,
    base="none",
    paper="Wortsman et al. 2022, Model soups, eq. 1 (uniform soup); weighted: Matena & Raffel 2022",
)
def linear(
    xs: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool
) -> torch.Tensor:
    """Weighted average y = sum_i w_i x_i / sum_i w_i (``normalize=False``: the plain weighted sum).

    As in mergekit, the sum accumulates in float32 (float64 for float64 inputs) in model
    order, the divisor is the float32 sum of the weights, and the result is cast back to
    the first input's dtype. ``base`` is not used: list the base among the models to average it in.
    """
    acc = accumulation_dtype(xs[0].dtype)
    w = torch.tensor(weight, dtype=torch.float32).to(acc)
    out = torch.mul(xs[0].to(acc), w[0])
    term = torch.empty_like(out) if len(xs) > 1 else out
    for wi, x in zip(w[1:], xs[1:]):
        torch.mul(x.to(acc), wi, out=term)  # w_i x_i rounded, then summed: mergekit's order
        out.add_(term)
    if normalize:
        out.div_(w.sum())
    return out.to(xs[0].dtype)
