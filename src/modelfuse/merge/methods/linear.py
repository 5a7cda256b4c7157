"""Weighted averaging of weights: model soups and their kin."""

from __future__ import annotations

import torch

from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import PerModel, merge_method, new_empty

#: entries per block (as the sparsifying methods: buffers stay in cache)
BLOCK = 1 << 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float32, or float64 for float64 inputs (mergekit's rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@merge_method(
    "linear",
    base="none",
    paper="Wortsman et al. 2022, Model soups, eq. 1 (uniform soup); weighted: Matena & Raffel 2022",
    mergekit=(
        "base: no role; a named base_model is one more input, after the listed models, with its "
        "weight from the top-level parameters (mergekit refuses a recipe without one; modelfuse "
        "then weighs the base 1). Uses weight and normalize, ignores the rest. Bit-equal where "
        "the products w_i x_i are exact, else last-bit differences (<= 4.8e-7 measured; mergekit "
        "accumulates with addcmul_)"
    ),
)
def linear(
    xs: list[torch.Tensor], base: torch.Tensor | None, *, weight: PerModel[float] = 1.0, normalize: bool = True
) -> torch.Tensor:
    """Weighted average y = sum_i w_i x_i / sum_i w_i (``normalize=False``: the plain weighted sum).

    As in mergekit, the sum accumulates in float32 (float64 for float64 inputs) in model
    order, the divisor is the float32 sum of the weights, and the result is cast back to
    the first input's dtype. ``base`` is never passed: a recipe's ``base_model`` is one more input
    (after the listed models), as in mergekit.
    """
    acc = accumulation_dtype(xs[0].dtype)
    w = torch.tensor(weight, dtype=torch.float32).to(acc)
    total = w.sum()
    out = new_empty(xs[0].shape, xs[0].dtype, xs[0].device)
    flat_out, flats = out.view(-1), [x.reshape(-1) for x in xs]
    arrays = _kernels.float32_arrays(flats)
    if arrays is not None:
        _kernels.weighted_sum(arrays, None, flat_out.numpy(), weight, normalize=normalize, div=float(total))
        return out
    # in blocks: the same elementwise operations, with cache-sized buffers instead of two
    # full-size temporaries
    size = max(1, min(BLOCK, out.numel()))
    sums = torch.empty(size, dtype=acc, device=out.device)
    term = torch.empty(size, dtype=acc, device=out.device)
    for a in range(0, out.numel(), size):
        b = min(a + size, out.numel())
        s = torch.mul(flats[0][a:b].to(acc), w[0], out=sums[: b - a])
        for wi, x in zip(w[1:], flats[1:]):
            s.add_(torch.mul(x[a:b].to(acc), wi, out=term[: b - a]))  # w_i x_i rounded, then summed
        if normalize:
            s.div_(total)
        flat_out[a:b] = s
    return out
