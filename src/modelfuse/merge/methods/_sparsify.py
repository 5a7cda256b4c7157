"""The steps the sparsifying task-vector methods share: trim or drop, rescale, elect signs, sum.

TIES, DARE, Model Breadcrumbs, DELLA and SCE are one pipeline with different parts, as in
mergekit's "generalized task arithmetic": task vectors tau_i = x_i - base, each sparsified
(top-k magnitudes, a magnitude window, Bernoulli drops with a flat or rank-based keep
probability) and optionally rescaled, then an optional sign election, a weighted sum
(optionally divided by the weights that took part), times lambda, plus the base.
Every step is written once here; a method module chooses its parts and defaults.

Tie-breaking follows mergekit: which of several equal magnitudes a cut keeps is decided
by ``torch.argsort`` / ``torch.sort`` over the float32 magnitudes. On CPU that sort is
libstdc++'s introsort, stable only up to 16 entries, so the order of equal values is an
artefact of the algorithm that no cheaper computation reproduces. The trims therefore
find the cut by a radix select (two histogram passes) and sort only when equal values
straddle it; the kept set is always the one the full sort gives. Deltas of large
quantized (bf16, often float32) tensors usually do straddle: then the sort is the cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods._base import Params

RescaleMode = Literal["l1", "l2", "linf", "inverse_density", "none"]

# Norms below this are treated as zero by the norm-matching rescale (mergekit's 1e-7).
RESCALE_EPS = 1e-7


def _rescale_from_bool(value: Any) -> Any:
    """mergekit recipes say ``rescale: true/false``: true is its L1 rescale, false none."""
    if isinstance(value, bool):
        return "l1" if value else "none"
    return value


Rescale = Annotated[RescaleMode, BeforeValidator(_rescale_from_bool)]
"""How kept entries are rescaled after sparsifying (a schema field type; booleans accepted).

- ``l1`` / ``l2`` / ``linf``: multiply by ||tau|| / ||kept|| in that norm (mergekit; skipped
  when either norm is below 1e-7). mergekit's ``rescale: true`` is ``l1``.
- ``inverse_density``: divide each kept entry by its keep probability (DARE's 1/(1-p),
  DELLA's per-entry 1/p_i; for deterministic trims, 1/density).
- ``none``: keep the surviving entries as they are.
"""


class WeightDensity(Params):
    """Per-model parameters of every sparsifying method: task-vector weight and kept fraction."""

    weight: float = 1.0
    density: float = Field(1.0, gt=0, le=1)


def _check_shape(i: int, x: torch.Tensor, base: torch.Tensor) -> None:
    if x.shape != base.shape:
        raise ConfigError(
            f"model {i}: tensor of shape {tuple(x.shape)} cannot be merged into the base's "
            f"{tuple(base.shape)}; task vectors need equal shapes"
        )


def task_vectors(xs: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """tau_i = x_i - base, each x_i cast to the base dtype first (mergekit's order)."""
    for i, x in enumerate(xs):
        _check_shape(i, x, base)
    return [x.to(base.dtype) - base for x in xs]


def sparsified_stack(
    xs: Sequence[torch.Tensor], base: torch.Tensor, sparsify: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``torch.stack([sparsify(i, tau_i) ...])`` with one task vector alive at a time (memory)."""
    for i, x in enumerate(xs):
        _check_shape(i, x, base)
    out = torch.empty((len(xs), *base.shape), dtype=base.dtype, device=base.device)
    for i, x in enumerate(xs):
        out[i] = sparsify(i, x.to(base.dtype) - base)
    return out


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for random masks and their rescale: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def magnitudes(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as a flat float32 tensor: what mergekit ranks for its deterministic trims."""
    return tau.abs().reshape(-1).float()


def order_statistics(w: torch.Tensor, ranks: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
    """For each 0-based ascending ``rank`` of non-negative float32 ``w``: (value, #less, #equal).

    A two-level radix select: non-negative floats order like their bit patterns, so one
    histogram of the high 16 bits finds the bucket, a second of the low 16 bits inside it
    the value. Two passes over ``w`` whatever the rank, and the tie counts come for free.
    """
    bits = w.view(torch.int32)
    high = bits >> 16
    below = torch.bincount(high, minlength=1 << 15).cumsum(0)
    out = []
    for r in ranks:
        bucket = int(torch.searchsorted(below, r, right=True))
        n_below = int(below[bucket - 1]) if bucket else 0
        low = torch.bincount(bits[high == bucket] & 0xFFFF, minlength=1 << 16)
        low_below = low.cumsum(0)
        j = int(torch.searchsorted(low_below, r - n_below, right=True))
        n_less = n_below + (int(low_below[j - 1]) if j else 0)
        value = torch.tensor((bucket << 16) | j, dtype=torch.int32, device=w.device).view(torch.float32)
        out.append((value, n_less, int(low[j])))
    return out


#: how equal magnitudes at a cut are ordered: "sort" as torch's (unstable) sort orders them,
#: mergekit's exact semantics; "index" by position (a stable sort), decided in linear time
TieBreak = Literal["sort", "index"]


def _first_equal(w: torch.Tensor, value: torch.Tensor, count: int, from_end: bool = False) -> torch.Tensor:
    """Positions of the first (or last) ``count`` entries of ``w`` equal to ``value``, by index."""
    where = torch.nonzero(w == value).reshape(-1)
    return where[where.numel() - count :] if from_end else where[:count]


def largest_magnitudes(tau: torch.Tensor, k: int, tie_break: str = "sort") -> torch.Tensor:
    """Boolean mask of the ``k`` largest |tau| (float32), ties as ``argsort(descending=True)[:k]``.

    ``tie_break="index"`` keeps the lowest positions among magnitudes equal to the k-th largest.
    """
    w = magnitudes(tau)
    n = w.numel()
    if k >= n:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device)
    if k <= 0:
        return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
    ((kth, n_less, _),) = order_statistics(w, [n - k])
    if n_less == n - k:  # every entry equal to the k-th largest fits: the cut is unambiguous
        keep = w >= kth
    elif tie_break == "index":  # a stable descending order keeps the first equal ones
        keep = w > kth
        keep[_first_equal(w, kth, k - int(keep.sum()))] = True
    else:  # equal magnitudes straddle the cut: the (unstable) sort decides which stay
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[torch.argsort(w, descending=True)[:k]] = True
    return keep.view(tau.shape)


def _stable_window(w: torch.Tensor, lo: int, hi: int, stats: dict) -> torch.Tensor:
    """Entries whose rank in the stable ascending order of ``w`` lies in ``[lo, hi)``.

    ``stats[r]`` = (value, #less, #equal) at rank r, for r = lo (if lo > 0) and hi - 1 (if hi < n).
    An entry equal to a cut value v with #less = c has rank c + j, j its order among equals.
    """
    keep = torch.ones_like(w, dtype=torch.bool)
    low = stats[lo] if lo > 0 else None
    high = stats[hi - 1] if hi < w.numel() else None
    if low is not None:
        keep &= w > low[0]
    if high is not None:
        keep &= w < high[0]

    def add_equal(value: torch.Tensor, less: int, stop: int | None) -> None:
        where = torch.nonzero(w == value).reshape(-1)
        keep[where[max(lo - less, 0) : None if stop is None else max(stop - less, 0)]] = True

    if low is not None and high is not None and bool(low[0] == high[0]):
        add_equal(low[0], low[1], hi)
    else:
        if low is not None:
            add_equal(low[0], low[1], hi)
        if high is not None:
            add_equal(high[0], high[1], hi)
    return keep


def magnitude_window(tau: torch.Tensor, lo: int, hi: int, tie_break: str = "sort") -> torch.Tensor:
    """Boolean mask of positions ``[lo, hi)`` of |tau| (float32) sorted ascending by ``torch.sort``.

    ``tie_break="index"`` orders equal magnitudes by position (a stable ascending sort).
    """
    w = magnitudes(tau)
    n = w.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo:
        return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
    if lo == 0 and hi == n:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device)
    ranks = ([lo] if lo > 0 else []) + ([hi - 1] if hi < n else [])
    stats = dict(zip(ranks, order_statistics(w, ranks)))
    keep: torch.Tensor | None = None
    exact = True
    if lo > 0:
        low, n_less, _ = stats[lo]
        exact &= n_less == lo
        keep = w >= low
    if hi < n:
        high, n_less, n_equal = stats[hi - 1]
        exact &= n_less + n_equal == hi
        keep = w <= high if keep is None else keep & (w <= high)
    if not exact and tie_break == "index":  # stable order: equal values ranked by position
        return _stable_window(w, lo, hi, stats).view(tau.shape)
    if not exact or keep is None:  # equal magnitudes straddle a cut: the sort decides
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[torch.sort(w).indices[lo:hi]] = True
    return keep.view(tau.shape)


def masked_rescaled(
    tau: torch.Tensor, mask: torch.Tensor, rescale: str, keep_prob: float | torch.Tensor
) -> torch.Tensor:
    """tau * mask, then rescaled (see ``Rescale``); computed in tau's dtype."""
    masked = tau * mask.to(tau.dtype)
    if rescale == "none":
        return masked
    if rescale == "inverse_density":
        return masked / keep_prob
    if rescale == "l1":
        before, after = tau.abs().sum(), masked.abs().sum()
    elif rescale == "l2":
        before, after = tau.norm(), masked.norm()
    elif rescale == "linf":
        before, after = tau.abs().max(), masked.abs().max()
    else:
        raise ConfigError(f"unknown rescale {rescale!r}; valid: l1, l2, linf, inverse_density, none")
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def trim_top_k(
    tau: torch.Tensor, density: float, rescale: str = "none", tie_break: str = "sort"
) -> torch.Tensor:
    """TIES trim: keep the k = max(1, floor(density * n)) largest |tau| (all of it at density 1)."""
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))
    return masked_rescaled(tau, largest_magnitudes(tau, k, tie_break), rescale, density)


def trim_threshold(
    tau: torch.Tensor, threshold: float, density: float, rescale: str = "none"
) -> torch.Tensor:
    """Global TIES trim: keep |tau| >= a threshold computed over the whole task vector."""
    keep = magnitudes(tau).view(tau.shape) >= threshold
    return masked_rescaled(tau, keep, rescale, density)


def trim_outliers(
    tau: torch.Tensor, density: float, gamma: float, rescale: str = "none", tie_break: str = "sort"
) -> torch.Tensor:
    """Breadcrumbs trim: drop the top floor(gamma n) and enough of the bottom to keep floor(density n).

    Sorted ascending, positions [n_bot, n_bot + target) stay, with target = floor(d n),
    n_top = floor(gamma n), n_bot = max(0, n - target - n_top). Density 1 keeps everything.
    """
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return masked_rescaled(tau, magnitude_window(tau, n_bot, n_bot + target, tie_break), rescale, density)


def drop_random(
    tau: torch.Tensor, density: float, rescale: str, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE drop: keep each entry with probability ``density`` (Bernoulli), then rescale.

    Masks and rescale run in float32 (float64 for float64 tensors), the result is cast back.
    Density 1 returns tau untouched and draws nothing from the generator.
    """
    if density >= 1:
        return tau
    work = tau.to(work_dtype(tau.dtype))
    mask = torch.empty_like(work).bernoulli_(density, generator=generator)
    return masked_rescaled(work, mask, rescale, density).to(tau.dtype)


def check_della_range(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities span [density - epsilon, density + epsilon]: it must lie in (0, 1)."""
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ConfigError(
            f"della needs 0 < density - epsilon and density + epsilon < 1 so that keep probabilities "
            f"lie in (0, 1); found density={density}, epsilon={epsilon} (range "
            f"[{density - epsilon:g}, {density + epsilon:g}]). Lower epsilon or move density"
        )


def rank_keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities p = (d - eps) + 2 eps (r - 1) / (n - 1), r the rank of |tau| in its row.

    Rows are taken along dim 1 (a 1-D tensor is one row; for more than two dims, mergekit's
    dim-1 fibres). Ranks come from ``torch.argsort`` of |tau| in tau's dtype, as in mergekit.
    A row of one entry, where the formula is 0/0, gets p = d. Float32 (float64) result.
    """
    rows = tau if tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    dtype = work_dtype(tau.dtype)
    order = torch.argsort(rows.abs(), dim=1)
    if n > 1:
        positions = torch.arange(n, device=tau.device).view(1, n, *([1] * (rows.dim() - 2)))
        ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
        rank_norm = ranks.to(dtype) / (n - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5, dtype=dtype, device=tau.device)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)


def drop_by_rank(
    tau: torch.Tensor, density: float, epsilon: float, rescale: str, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA MagPrune: Bernoulli drop with rank-based keep probabilities, then rescale."""
    if density >= 1:
        return tau
    check_della_range(density, epsilon)
    probs = rank_keep_probabilities(tau, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    return masked_rescaled(tau.to(probs.dtype), mask, rescale, probs).to(tau.dtype)


def merge_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    votes: torch.Tensor | None = None,
    block: int = 1 << 21,
) -> torch.Tensor:
    """y = base + lambda * sum_i m_i w_i delta_i [/ D], all in the base dtype (mergekit's GTA step).

    ``deltas`` stacks the (sparsified) task vectors along dim 0 and is consumed (weighted
    in place). Without election m_i = 1 and D = sum_i w_i (|D| < 1e-8 becomes 1). With
    election the sign s = +1 where sum_i v_i >= 0 else -1, with v_i the vote inputs (by
    default the weighted deltas u_i = w_i delta_i; ``votes`` stacks others, e.g. the
    unweighted deltas), m_i = [sign(v_i) == s] (zeros never agree), D = sum_i m_i w_i
    (D == 0 becomes 1). ``normalize`` divides by D; lambda multiplies last. The operations
    are mergekit's, in its order, so results match it bit for bit. Every step is
    elementwise across models, so it runs on ``block`` entries at a time: the temporaries
    of a large tensor (signs, agreement masks, sums) stay a few MiB.
    """
    out = torch.empty_like(base)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_deltas = deltas.reshape(deltas.shape[0], -1)
    flat_votes = votes.reshape(votes.shape[0], -1) if votes is not None else None
    for a in range(0, max(flat_base.numel(), 1), block):
        z = slice(a, a + block)
        flat_out[z] = _merge_block(
            flat_base[z],
            flat_deltas[:, z],
            weight,
            elect=elect,
            normalize=normalize,
            lambda_=lambda_,
            votes=flat_votes[:, z] if flat_votes is not None else None,
        )
    return out


def _merge_block(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    votes: torch.Tensor | None,
) -> torch.Tensor:
    dtype = base.dtype
    weighted = deltas.to(dtype)
    w = torch.tensor(list(weight), dtype=dtype, device=base.device).view(-1, *([1] * base.dim()))
    weighted.mul_(w)
    if elect:
        v = weighted if votes is None else votes.to(dtype)
        one = torch.ones((), dtype=dtype, device=base.device)
        elected = torch.where(v.sum(dim=0) >= 0, one, -one)
        agree = v.sign().eq_(elected)  # 1 where the sign is the elected one, else 0
        del v
        mixed = weighted.mul_(agree).sum(dim=0)
        divisor = agree.mul_(w).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del weighted
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(dtype)
