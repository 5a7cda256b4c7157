"""Sparsifiers: one model's trim or drop of its task vector, and its rescale, block by block.

TIES (top-k), breadcrumbs (a magnitude window), global TIES (a threshold), DARE (flat
random drops) and DELLA (rank-based random drops) are parts of one pipeline
(``_engine.gta_merge``); each part here first gathers what it needs over the whole task
vector (magnitude statistics for a cut, norms for a rescale), then keeps entries block by
block.

Cuts by magnitude (TIES' top-k, breadcrumbs' window) are found by a radix select over the
float32 magnitudes (two histogram passes; non-negative floats order like their bits).
Equal magnitudes at a cut are a choice, ``tie_break``:

- ``"index"`` (the default): by position, as a stable sort orders them: TIES keeps the
  first equal entries, breadcrumbs ranks equal entries by position. Linear time. This is
  what mergekit computes on a GPU, where torch sorts more than 4096 entries with a stable
  radix sort, and on CPU for tensors of at most 16 entries.
- ``"sort"``: as ``torch.argsort`` / ``torch.sort`` of the float32 magnitudes orders them
  on CPU, i.e. mergekit's CPU output bit for bit. That sort is libstdc++'s introsort,
  whose order of equal values is an artefact of the algorithm that no cheaper computation
  reproduces; when equal values straddle a cut (deltas of bf16 models, and most deltas of
  float32 ones, lie on a coarse grid) the whole tensor is sorted.

The functions at the end apply one part to one task vector (for callers and tests holding
one tau).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator

from modelfuse.errors import ConfigError
from modelfuse.merge.methods._random import model_seeds, uniforms
from modelfuse.merge.methods._select import MagnitudeCut, MagnitudeSource, top_k_cut, window_cut
from modelfuse.merge.methods._task_vectors import TaskVectors, default_block, work_dtype

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

#: how equal magnitudes at a cut are ordered (see the module docstring)
TieBreak = Literal["index", "sort"]


class Sparsifier:
    """One model's sparsify-and-rescale step over its task vector, seen in blocks.

    ``fit`` runs statistics passes over the whole task vector, ``begin`` resets the state
    that blocks consume in order (position windows, random streams), ``keep`` gives the
    kept entries of a block (a bool mask, or None for all) and their keep probability
    (for ``rescale="inverse_density"``). ``unit``: block lengths must be multiples of it.
    ``float_work``: mask and rescale in float32 (float64 for float64), as the random drops
    do; otherwise in the task vector's dtype, as the deterministic trims do.
    """

    unit = 1
    float_work = False

    def __init__(self, rescale: str = "none"):
        if rescale not in ("l1", "l2", "linf", "inverse_density", "none"):
            raise ConfigError(f"unknown rescale {rescale!r}; valid: l1, l2, linf, inverse_density, none")
        self.rescale = rescale
        self.factor = 1.0  # the norm-matching rescale, set by the norm pass

    def fit(self, tv: TaskVectors, i: int) -> None:
        """Statistics over model i's whole task vector (default: none needed)."""

    def begin(self) -> None:
        """Reset what the blocks consume in order."""

    def keep(
        self, tv: TaskVectors, tau: torch.Tensor, a: int, b: int
    ) -> tuple[torch.Tensor | None, float | torch.Tensor]:
        raise NotImplementedError

    # -- applying it ------------------------------------------------------------------------
    def _work(self, tau: torch.Tensor) -> torch.Tensor:
        return tau.to(work_dtype(tau.dtype)) if self.float_work else tau

    def norm_pass(self, tv: TaskVectors, i: int) -> None:
        """For ``l1`` / ``l2`` / ``linf``: factor = ||tau|| / ||kept|| over the whole tensor."""
        if self.rescale not in ("l1", "l2", "linf"):
            return
        self.begin()
        before = after = 0.0
        for a, b in tv.spans():
            tau = self._work(tv.block(i, a, b))
            keep, _ = self.keep(tv, tau, a, b)
            kept = tau if keep is None else tau * keep
            if self.rescale == "l1":
                before += float(tau.abs().sum(dtype=torch.float64))
                after += float(kept.abs().sum(dtype=torch.float64))
            elif self.rescale == "l2":
                before += float(tau.double().square().sum())
                after += float(kept.double().square().sum())
            else:
                before = max(before, float(tau.abs().max()) if tau.numel() else 0.0)
                after = max(after, float(kept.abs().max()) if kept.numel() else 0.0)
        if self.rescale == "l2":
            before, after = math.sqrt(before), math.sqrt(after)
        self.factor = 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after

    def into(self, tv: TaskVectors, i: int, a: int, b: int, out: torch.Tensor) -> None:
        """Model i's sparsified, rescaled task vector on [a, b), in ``out``'s dtype."""
        tau = tv.block(i, a, b)
        keep, prob = self.keep(tv, tau, a, b)
        if keep is None and self.rescale != "inverse_density" and self.factor == 1.0:
            out.copy_(tau)
            return
        work = self._work(tau)
        kept = work if keep is None else (torch.mul(work, keep, out=out) if work is tau else work * keep)
        if self.rescale == "inverse_density":
            kept = kept.div_(prob)
        elif self.factor != 1.0:
            kept = kept.mul_(self.factor)
        if kept is not out:
            out.copy_(kept)


class KeepAll(Sparsifier):
    """Density 1: the task vector as it is (no rescale applies: nothing was dropped)."""

    def __init__(self) -> None:
        super().__init__("none")

    def keep(self, tv, tau, a, b):
        return None, 1.0

    def into(self, tv: TaskVectors, i: int, a: int, b: int, out: torch.Tensor) -> None:
        tv.block(i, a, b, out=out)


class _CutSparsifier(Sparsifier):
    """A deterministic magnitude cut; ``tie_break="sort"`` materialises torch's sort order when needed."""

    def __init__(self, density: float, rescale: str, tie_break: str):
        super().__init__(rescale)
        if tie_break not in ("index", "sort"):
            raise ConfigError(f"unknown tie_break {tie_break!r}; valid: index, sort")
        self.density = density
        self.tie_break = tie_break
        self.cut: MagnitudeCut | None = None
        self.full: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def make_cut(self, source: MagnitudeSource, n: int) -> MagnitudeCut:
        raise NotImplementedError

    def sorted_mask(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, tv: TaskVectors, i: int) -> None:
        self.cut = self.make_cut(tv.source(i), tv.n)
        if self.cut.partial and self.tie_break == "sort":
            self.full = self.sorted_mask(torch.cat([w.clone() for w in tv.magnitude_blocks(i)()]))

    def begin(self) -> None:
        if self.cut is not None:
            self.cut.begin()

    def keep(self, tv, tau, a, b, exact_zeros: bool = False):
        if self.full is not None:
            return self.full[a:b], self.density
        assert self.cut is not None, "fit() first"
        return self.cut.mask(tv.magnitudes(tau), exact_zeros), self.density


class TopK(_CutSparsifier):
    """TIES trim: the k = max(1, floor(density n)) largest |tau| (float32 magnitudes), or a given k."""

    def __init__(self, density: float, rescale: str, tie_break: str, k: int | None = None):
        super().__init__(density, rescale, tie_break)
        self.k = k

    def make_cut(self, source, n):
        if self.k is None:
            self.k = max(1, int(self.density * n))
        return top_k_cut(source, n, self.k)

    def sorted_mask(self, w):
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[torch.argsort(w, descending=True)[: self.k]] = True
        return keep


class Window(_CutSparsifier):
    """Breadcrumbs: ascending sorted positions [n_bot, n_bot + floor(d n)) of |tau|,
    n_bot = max(0, n - floor(d n) - floor(gamma n)); or a given ``span`` [lo, hi)."""

    def __init__(
        self, density: float, gamma: float, rescale: str, tie_break: str, span: tuple[int, int] | None = None
    ):
        super().__init__(density, rescale, tie_break)
        self.gamma = gamma
        self.span = span

    def make_cut(self, source, n):
        if self.span is None:
            target, n_top = int(self.density * n), int(self.gamma * n)
            lo = max(0, n - target - n_top)
            self.span = (lo, lo + target)
        return window_cut(source, n, *self.span)

    def sorted_mask(self, w):
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[torch.sort(w).indices[self.span[0] : self.span[1]]] = True
        return keep


class Threshold(Sparsifier):
    """Global TIES trim: keep |tau| >= a threshold computed over the whole task vector."""

    def __init__(self, threshold: float, density: float, rescale: str):
        super().__init__(rescale)
        self.threshold, self.density = threshold, density
        self.cut = MagnitudeCut()
        self.cut.add_value(float(np.float32(threshold)), 0, 1, 1, "low")  # |tau| >= threshold

    def keep(self, tv, tau, a, b):
        return self.cut.mask(tv.magnitudes(tau)), self.density


class _RandomDrop(Sparsifier):
    """A random drop: entry j is kept when u_j < p_j (``uniforms`` of the model's seed), in
    the work dtype. The draws depend only on the seed and the position, so the norm pass
    and the merge pass draw the same ones without storing them."""

    float_work = True

    def __init__(self, rescale: str, seed: int):
        super().__init__(rescale)
        self.seed = seed

    def probabilities(self, tau: torch.Tensor) -> float | torch.Tensor:
        raise NotImplementedError

    def keep(self, tv, tau, a, b):
        p = self.probabilities(tau)
        u = uniforms(self.seed, a, b - a, tau.device).to(tau.dtype)
        # 1.0 where u < p: p - u > 0 exactly when u < p (a float difference is 0 only for equal values)
        diff = torch.sub(p, u, out=u) if isinstance(p, torch.Tensor) else u.neg_().add_(p)
        return diff.relu_().sign_(), p


class RandomKeep(_RandomDrop):
    """DARE drop: keep entry j when u_j < density (see ``uniforms``)."""

    def __init__(self, density: float, rescale: str, seed: int):
        super().__init__(rescale, seed)
        self.density = density

    def probabilities(self, tau):
        return self.density


def _fibres(shape: Sequence[int]) -> tuple[int, int]:
    """(row length, inner size) of DELLA's rows: dim-1 fibres of a tensor with 2+ dims, else all of it."""
    if len(shape) >= 2:
        return shape[1], math.prod(shape[2:])
    return math.prod(shape), 1


class RankKeep(_RandomDrop):
    """DELLA MagPrune: keep probability p = (d - eps) + 2 eps r / (n - 1) from the rank r of |tau|
    in its row (0-based; equal magnitudes ranked by position), kept when u < p (see ``uniforms``)."""

    def __init__(self, density: float, epsilon: float, rescale: str, seed: int, shape: Sequence[int]):
        super().__init__(rescale, seed)
        check_della_range(density, epsilon)
        self.density, self.epsilon = density, epsilon
        self.row, self.inner = _fibres(shape)
        self.unit = max(1, self.row * self.inner)

    def probabilities(self, tau):
        return rank_probabilities(tau.view(-1, self.row, self.inner), self.density, self.epsilon).view(-1)


def rank_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (d - eps) + 2 eps r / (n - 1) for ``rows`` of shape (R, n, inner), r the rank along dim 1.

    Ranks come from a stable ``torch.argsort`` of |tau| in tau's dtype: equal magnitudes
    are ranked by position (mergekit's unstable CPU sort orders them arbitrarily; its draws
    differ from ours anyway). A row of one entry, where the formula is 0/0, gets p = d.
    Float32 (float64 for float64) result.
    """
    n = rows.shape[1]
    dtype = work_dtype(rows.dtype)
    if n <= 1:
        return torch.full(rows.shape, density, dtype=dtype, device=rows.device)
    mags = rows.abs()
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(mags.dtype, torch.int16)
    if mags.element_size() == torch.empty((), dtype=bits).element_size():
        mags = mags.view(bits)  # non-negative floats order like their bit patterns: a faster sort
    order = torch.argsort(mags, dim=1, stable=True)
    positions = torch.arange(n, device=rows.device).view(1, n, 1).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks.to(dtype).div_(n - 1).mul_(2 * epsilon).add_(density - epsilon)


def check_della_range(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities span [density - epsilon, density + epsilon]: it must lie in (0, 1)."""
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ConfigError(
            f"della needs 0 < density - epsilon and density + epsilon < 1 so that keep probabilities "
            f"lie in (0, 1); found density={density}, epsilon={epsilon} (range "
            f"[{density - epsilon:g}, {density + epsilon:g}]). Lower epsilon or move density"
        )


def sparsify(tau: torch.Tensor, part: Sparsifier, block: int | None = None) -> torch.Tensor:
    """``part`` applied to one task vector (as ``gta_merge`` applies it), in tau's dtype;
    contiguous whatever tau's layout."""
    zero = torch.zeros(tau.shape, dtype=tau.dtype, device=tau.device)
    size = default_block(tau.device) if block is None else block
    tv = TaskVectors([tau], zero, max(part.unit, size // part.unit * part.unit))
    part.fit(tv, 0)
    part.norm_pass(tv, 0)
    part.begin()
    out = torch.empty(tau.shape, dtype=tau.dtype, device=tau.device)
    flat = out.view(-1)
    for a, b in tv.spans():
        part.into(tv, 0, a, b, flat[a:b])
    return out


def _mask_of(tau: torch.Tensor, part: _CutSparsifier) -> torch.Tensor:
    tv = TaskVectors(
        [tau], torch.zeros(tau.shape, dtype=tau.dtype, device=tau.device), default_block(tau.device)
    )
    part.fit(tv, 0)
    part.begin()
    keep = torch.empty(tau.shape, dtype=torch.bool, device=tau.device)
    flat = keep.view(-1)
    for a, b in tv.spans():
        mask, _ = part.keep(tv, tv.block(0, a, b), a, b, exact_zeros=True)
        flat[a:b] = mask
    return keep


def largest_magnitudes(tau: torch.Tensor, k: int, tie_break: str = "index") -> torch.Tensor:
    """Boolean mask of the ``k`` largest |tau| (float32); equal ones at the cut per ``tie_break``."""
    return _mask_of(tau, TopK(1.0, "none", tie_break, k=k))


def magnitude_window(tau: torch.Tensor, lo: int, hi: int, tie_break: str = "index") -> torch.Tensor:
    """Boolean mask of ascending sorted positions ``[lo, hi)`` of |tau| (float32), ties per ``tie_break``."""
    return _mask_of(tau, Window(1.0, 0.0, "none", tie_break, span=(lo, hi)))


def drop_random(
    tau: torch.Tensor, density: float, rescale: str, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE drop of one task vector, drawing its seed from ``generator`` as ``dare_*`` do per model.

    Density 1 returns tau untouched and draws nothing.
    """
    if density >= 1:
        return tau
    (seed,) = model_seeds(generator, [True], tau.device)
    return sparsify(tau, RandomKeep(density, rescale, seed))


def drop_by_rank(
    tau: torch.Tensor, density: float, epsilon: float, rescale: str, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA MagPrune of one task vector, drawing its seed from ``generator`` as ``della*`` do per model."""
    if density >= 1:
        return tau
    check_della_range(density, epsilon)
    (seed,) = model_seeds(generator, [True], tau.device)
    return sparsify(tau, RankKeep(density, epsilon, rescale, seed, tau.shape))


def rank_keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities of one task vector (rows as in ``RankKeep``), float32 (float64)."""
    row, inner = _fibres(tau.shape)
    if tau.numel() == 0:
        return torch.empty(tau.shape, dtype=work_dtype(tau.dtype), device=tau.device)
    return rank_probabilities(tau.reshape(-1, row, inner), density, epsilon).reshape(tau.shape)
