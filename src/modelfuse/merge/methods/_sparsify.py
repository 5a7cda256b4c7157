"""The steps the sparsifying task-vector methods share: trim or drop, rescale, elect signs, sum.

TIES, DARE, Model Breadcrumbs and DELLA are one pipeline with different parts, as in
mergekit's "generalized task arithmetic": task vectors tau_i = x_i - base, each sparsified
(top-k magnitudes, a magnitude window, a global threshold, Bernoulli drops with a flat or
rank-based keep probability) and optionally rescaled, then an optional sign election, a
weighted sum (optionally divided by the weights that took part), times lambda, plus the
base. Every step is written once here; a method module chooses its parts and defaults.

Execution is blockwise (``gta_merge``): a sparsifier first gathers what it needs over the
whole task vector (magnitude histograms for a cut, norms for a rescale) in passes over
blocks of ``BLOCK`` entries, then the merge runs block by block. Task vectors are
recomputed per block into reused buffers, so a tensor of any size costs its inputs and
its output plus a few MiB, and the work stays in cache: no full-size temporaries (a
stacked task-vector tensor, masks, magnitudes) exist. Every step is elementwise or a
reduction over models, so the blocks give the same bytes as whole-tensor code.

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
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import Params, new_empty

RescaleMode = Literal["l1", "l2", "linf", "inverse_density", "none"]

# Norms below this are treated as zero by the norm-matching rescale (mergekit's 1e-7).
RESCALE_EPS = 1e-7

#: entries per block on CPU: the block's buffers (a few per model) stay in L2 and under
#: glibc's mmap threshold, so they are reused instead of faulted in afresh
BLOCK = 1 << 16


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


# ---------------------------------------------------------------------------------------------
# Task vectors by blocks
# ---------------------------------------------------------------------------------------------


class TaskVectors:
    """tau_i = x_i - base over flat blocks ``[a, b)``, computed into reused buffers.

    ``block(i, a, b)`` and ``magnitudes(tau)`` return views of one buffer each: valid until
    the next call. Spans are ``block`` entries long (the last one shorter).
    """

    def __init__(self, xs: Sequence[torch.Tensor], base: torch.Tensor, block: int):
        for i, x in enumerate(xs):
            _check_shape(i, x, base)
        self.base = base.reshape(-1)
        self.xs = [x.reshape(-1) for x in xs]
        self.n = self.base.numel()
        self.size = max(1, min(block, self.n))
        self._tau = torch.empty(self.size, dtype=base.dtype, device=base.device)
        self._mag = torch.empty(self.size, dtype=torch.float32, device=base.device)
        self._high: torch.Tensor | None = None

    def spans(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.n, self.size):
            yield a, min(a + self.size, self.n)

    def block(self, i: int, a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.xs[i][a:b]
        if x.dtype != self.base.dtype:
            x = x.to(self.base.dtype)
        return torch.sub(x, self.base[a:b], out=self._tau[: b - a] if out is None else out)

    def magnitudes(self, tau: torch.Tensor) -> torch.Tensor:
        w = self._mag[: tau.numel()]
        if tau.dtype == torch.float32:
            return torch.abs(tau, out=w)
        return w.copy_(tau).abs_()  # rounding to float32 commutes with abs

    def magnitude_blocks(self, i: int) -> Callable[[], Iterator[torch.Tensor]]:
        """A re-iterable source of model i's float32 magnitudes, block by block."""
        return lambda: (self.magnitudes(self.block(i, a, b)) for a, b in self.spans())

    def magnitudes_at(self, i: int, where: torch.Tensor) -> torch.Tensor:
        """Model i's float32 magnitudes at flat positions ``where``."""
        return (self.xs[i][where].to(self.base.dtype) - self.base[where]).abs().float()

    def source(self, i: int) -> MagnitudeSource:
        if self._high is None:  # shared by the models: their statistics run one after another
            self._high = new_empty((self.n,), torch.int16, self.base.device)
        return MagnitudeSource(
            self.magnitude_blocks(i), lambda where: self.magnitudes_at(i, where), self.n, self._high
        )


class MagnitudeSource:
    """One task vector's float32 magnitudes, for order statistics: blocks in order, values by position."""

    def __init__(
        self,
        blocks: Callable[[], Iterator[torch.Tensor]],
        at: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        store: torch.Tensor | None = None,
    ):
        self.blocks, self.at, self.n, self.store = blocks, at, n, store

    def order_statistics(self, ranks: Sequence[int]) -> list[tuple[float, int, int]]:
        return order_statistics(self.blocks, self.at, self.n, ranks, self.store)


# ---------------------------------------------------------------------------------------------
# Cuts by magnitude: radix select over blocks
# ---------------------------------------------------------------------------------------------

_HIGH = 1 << 15  # buckets of the high 16 bits of a non-negative float32 (sign bit clear)
_LOW = 1 << 16


def _float_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # the int16 half holding a float32's high bits


def order_statistics(
    blocks: Callable[[], Iterator[torch.Tensor]],
    at: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    ranks: Sequence[int],
    store: torch.Tensor | None = None,
    chunk: int = 1 << 20,
) -> list[tuple[float, int, int]]:
    """For each 0-based ascending ``rank`` of n non-negative float32 values: (value, #less, #equal).

    ``blocks()`` yields the values block by block, ``at(positions)`` gives the values at
    some positions. A two-level radix select: non-negative floats order like their bit
    patterns, so a histogram of the high 16 bits finds the bucket of each rank, and the
    low 16 bits of the (few) entries in that bucket the value. One pass over the values:
    the high halves are kept (int16, in ``store`` when given), and the bucket's entries
    are found in them and fetched by position. Tie counts come for free.
    """
    if not ranks or n == 0:
        return []
    high = store[:n] if store is not None else torch.empty(n, dtype=torch.int16)
    pos = 0
    for w in blocks():
        high[pos : pos + w.numel()].copy_(w.view(torch.int16)[_HIGH_HALF::2])
        pos += w.numel()
    hist = torch.zeros(_HIGH, dtype=torch.int64, device=high.device)
    for a in range(0, n, chunk):
        hist.add_(torch.bincount(high[a : a + chunk], minlength=_HIGH))
    below = hist.cumsum(0).cpu()
    buckets = [int(torch.searchsorted(below, r, right=True)) for r in ranks]
    lows = {}
    for b in set(buckets):
        where = torch.cat(
            [torch.nonzero(high[a : a + chunk] == b).reshape(-1) + a for a in range(0, n, chunk)]
        )
        lows[b] = torch.bincount(at(where).view(torch.int32) & 0xFFFF, minlength=_LOW).cpu()
    out = []
    for r, b in zip(ranks, buckets):
        n_below = int(below[b - 1]) if b else 0
        counts = lows[b]
        low_below = counts.cumsum(0)
        j = int(torch.searchsorted(low_below, r - n_below, right=True))
        n_less = n_below + (int(low_below[j - 1]) if j else 0)
        out.append((_float_of_bits((b << 16) | j), n_less, int(counts[j])))
    return out


class MagnitudeCut:
    """Keep entries by float32 magnitude: above ``low`` (at it too if ``low_incl``), below
    ``high`` (likewise), plus, for a value v whose equal entries the cut splits, those whose
    position order among the entries equal to v lies in ``[j0, j1)``.

    Position windows are consumed in order, so ``mask`` must see the blocks in order after
    ``begin()``.
    """

    def __init__(self) -> None:
        self.low: float | None = None
        self.low_incl = True
        self.high: float | None = None
        self.high_incl = True
        self.windows: list[tuple[float, int, int]] = []
        self.empty = False
        self._seen: list[int] = []

    @property
    def partial(self) -> bool:
        """True when equal magnitudes straddle a cut (a tie-break decides)."""
        return bool(self.windows)

    def add_value(self, value: float, j0: int, j1: int, n_equal: int, sides: str) -> None:
        """A bound at ``value`` (``sides``: "low", "high" or "both"); of the ``n_equal`` entries
        equal to it, those at positions [j0, j1) among them are kept."""
        j0, j1 = max(j0, 0), min(j1, n_equal)
        full = j0 == 0 and j1 == n_equal
        if sides in ("low", "both"):
            self.low, self.low_incl = value, full
        if sides in ("high", "both"):
            self.high, self.high_incl = value, full
        if not full and j1 > j0:
            self.windows.append((value, j0, j1))

    def begin(self) -> None:
        self._seen = [0] * len(self.windows)

    def mask(self, w: torch.Tensor, exact_zeros: bool = False) -> torch.Tensor:
        """Turn magnitude block ``w`` (float32, overwritten; blocks in order) into 1.0 where kept, else 0.

        Float ops only (``threshold``, ``sign``): comparisons into bool tensors and products
        with them cost several times more on CPU. Kept zeros read 0 unless ``exact_zeros``,
        which changes no merge: a zero entry contributes nothing whether kept or not.
        """
        if self.empty:
            return w.zero_()
        zeros = None
        if exact_zeros and (self.low is None or (self.low == 0 and self.low_incl)):
            zeros = w == 0
        extra = []  # entries equal to a split value, kept by position
        for k, (value, j0, j1) in enumerate(self.windows):
            seen = self._seen[k]
            if seen >= j1:
                continue
            equal = w == value
            count = int(torch.count_nonzero(equal))
            if count and seen + count > j0:
                where = torch.nonzero(equal).reshape(-1)
                extra.append(where[max(j0 - seen, 0) : j1 - seen])
            self._seen[k] = seen + count
        if self.low is not None:
            # threshold keeps x > t: "w >= low" is "w > the float32 just below low"
            t = self.low if not self.low_incl else _next_float(self.low, toward=0.0)
            torch.threshold_(w, t, 0.0)
        if self.high is not None:  # negated, "w <= high" is "-w > -(the float32 just above high)"
            t = self.high if not self.high_incl else _next_float(self.high, toward=math.inf)
            torch.threshold_(w.neg_(), -t, 0.0)
        torch.sign(w, out=w)
        if self.high is not None:
            w.abs_()
        for where in extra:
            w[where] = 1.0
        if zeros is not None:
            w[zeros] = 1.0
        return w


def _next_float(value: float, toward: float) -> float:
    """The float32 next to ``value`` in the direction of ``toward``."""
    return float(np.nextafter(np.float32(value), np.float32(toward)))


def top_k_cut(source: MagnitudeSource, n: int, k: int) -> MagnitudeCut:
    """The k largest magnitudes; equal ones at the cut by position (a stable descending sort)."""
    cut = MagnitudeCut()
    if k >= n:
        return cut
    if k <= 0:
        cut.empty = True
        return cut
    ((value, n_less, n_equal),) = source.order_statistics([n - k])
    greater = n - n_less - n_equal
    cut.add_value(value, 0, k - greater, n_equal, "low")
    return cut


def window_cut(source: MagnitudeSource, n: int, lo: int, hi: int) -> MagnitudeCut:
    """Ascending ranks [lo, hi) of the magnitudes; equal ones ranked by position (a stable sort)."""
    cut = MagnitudeCut()
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo:
        cut.empty = True
        return cut
    ranks = ([lo] if lo > 0 else []) + ([hi - 1] if hi < n else [])
    stats = dict(zip(ranks, source.order_statistics(ranks)))
    low = stats.get(lo) if lo > 0 else None
    high = stats.get(hi - 1) if hi < n else None
    if low is not None and high is not None and low[0] == high[0]:
        value, n_less, n_equal = low  # one value spans the whole window
        cut.add_value(value, lo - n_less, hi - n_less, n_equal, "both")
        return cut
    if low is not None:
        value, n_less, n_equal = low
        cut.add_value(value, lo - n_less, hi - n_less, n_equal, "low")
    if high is not None:
        value, n_less, n_equal = high
        cut.add_value(value, lo - n_less, hi - n_less, n_equal, "high")
    return cut


# ---------------------------------------------------------------------------------------------
# Sparsifiers: one model's trim or drop, applied block by block
# ---------------------------------------------------------------------------------------------


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


def model_seeds(generator: torch.Generator | None, draw: Sequence[bool], device: torch.device) -> list[int]:
    """One seed per model that draws (in model order) from ``generator``; 0 for the others."""
    seeds = []
    for d in draw:
        if d:
            seeds.append(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
        else:
            seeds.append(0)
    return seeds


#: SplitMix64 (Steele, Lea & Flood 2014): the state advances by GOLDEN, the output mixes it
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniforms(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The random draws of one model: u_j for positions j in [start, start + count), float32.

    u_j is output j of SplitMix64 seeded with ``seed`` (state seed + (j + 1) * GOLDEN mod 2^64,
    mixed), its top 24 bits times 2^-24: uniform on the float32 grid of [0, 1) that
    ``torch.rand`` uses. A counter-based stream: any block of positions is drawn alone, in
    any order, on any device, by the torch code and by the C kernels alike (which do this
    in their loops).
    """
    x = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    x.mul_(_int64(GOLDEN)).add_(_int64(seed))
    x ^= _shift_right(x, 30)
    x.mul_(_int64(MIX1))
    x ^= _shift_right(x, 27)
    x.mul_(_int64(MIX2))
    x ^= _shift_right(x, 31)
    return _shift_right(x, 40).to(torch.float32).mul_(2.0**-24)


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


# ---------------------------------------------------------------------------------------------
# The merge: sparsify, weight, elect, sum, block by block
# ---------------------------------------------------------------------------------------------


def default_block(device: torch.device) -> int:
    """Blocks on CPU keep the work in cache; a GPU wants whole tensors."""
    return BLOCK if device.type == "cpu" else 1 << 62


def gta_merge(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    parts: Sequence[Sparsifier],
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    unweighted_vote: bool = False,
    block: int | None = None,
) -> torch.Tensor:
    """y = base + lambda * sum_i m_i w_i s_i [/ D], s_i = ``parts[i]`` applied to tau_i = x_i - base.

    The merge step is ``merge_deltas``' (mergekit's order of operations, in the base dtype);
    ``unweighted_vote`` elects on sum_i s_i instead of sum_i w_i s_i. Runs in blocks of
    ``block`` entries (rounded to the parts' row unit), see the module docstring.
    """
    fast = _kernel_merge(xs, base, parts, weight, elect, normalize, lambda_, unweighted_vote, block)
    if fast is not None:
        return fast
    base_flat = base.reshape(-1)
    unit = max((p.unit for p in parts), default=1)
    size = default_block(base.device) if block is None else block
    size = max(unit, size // unit * unit)
    tv = TaskVectors(xs, base, size)
    for i, part in enumerate(parts):
        part.fit(tv, i)
        part.norm_pass(tv, i)
        part.begin()
    out = new_empty(base.shape, base.dtype, base.device)
    flat_out = out.view(-1)
    n_models = len(parts)
    deltas = torch.empty((n_models, tv.size), dtype=base.dtype, device=base.device)
    votes = torch.empty_like(deltas) if elect and unweighted_vote else None
    scratch = MergeScratch(weight, tv.size, base.dtype, base.device)
    for a, b in tv.spans():
        d = deltas[:, : b - a]
        for i, part in enumerate(parts):
            part.into(tv, i, a, b, d[i])
        v = None
        if votes is not None:
            v = votes[:, : b - a].copy_(d)
        merge_block(
            flat_out[a:b],
            base_flat[a:b],
            d,
            scratch,
            elect=elect,
            normalize=normalize,
            lambda_=lambda_,
            votes=v,
        )
    return out


class KernelMagnitudes:
    """Model i's float32 magnitudes |x_i - base| for order statistics, through the compiled
    kernels (``_kernels``): the radix select of ``order_statistics`` in two fused passes,
    remembering the positions of the entries equal to each value it returns."""

    def __init__(self, x: np.ndarray, base: np.ndarray, high: np.ndarray | None):
        self.x, self.base, self.high = x, base, high
        self.n = base.size
        self.equal: dict[int, np.ndarray] = {}  # value bits -> positions of the equal entries
        self._hist: np.ndarray | None = None

    def order_statistics(self, ranks: Sequence[int]) -> list[tuple[float, int, int]]:
        if not ranks or self.n == 0:
            return []
        if self._hist is None:
            self._hist = _kernels.magnitude_highs(self.x, self.base, self.high)
        below = np.cumsum(self._hist)
        buckets = [int(np.searchsorted(below, r, side="right")) for r in ranks]
        wanted = sorted(set(buckets))  # one scan fetches the entries of every bucket asked for
        all_bits, all_where = _kernels.bucket_entries(
            self.x, self.base, self.high, wanted, int(sum(self._hist[b] for b in wanted))
        )
        out = []
        for r, bucket in zip(ranks, buckets):
            n_below = int(below[bucket - 1]) if bucket else 0
            mine = (all_bits >> 16) == bucket
            bits, where = all_bits[mine], all_where[mine]
            ordered = np.sort(bits)
            value = int(ordered[r - n_below])
            first = int(np.searchsorted(ordered, value, side="left"))
            last = int(np.searchsorted(ordered, value, side="right"))
            self.equal[value] = where[bits == value]
            out.append((_float_of_bits(value), n_below + first, last - first))
        return out


def _bits_of_float(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _kernel_cut(cut: MagnitudeCut, source: KernelMagnitudes | None, rule: np.ndarray) -> np.ndarray:
    """A ``MagnitudeCut`` as the kernel's bounds on the float32 bits (keep lo < bits < hi,
    in ``rule``); returns the positions of the equal entries that its windows keep."""
    rule[_kernels.R_MODE] = _kernels.KEEP_CUT
    if cut.empty:
        rule[_kernels.R_LO] = rule[_kernels.R_HI] = _kernels.NONE_HIGH
        return np.empty(0, np.int64)
    if cut.low is not None:
        bits = _bits_of_float(cut.low)
        rule[_kernels.R_LO] = bits - 1 if cut.low_incl else bits
    if cut.high is not None:
        bits = _bits_of_float(cut.high)
        rule[_kernels.R_HI] = bits + 1 if cut.high_incl else bits
    assert source is not None or not cut.windows, "position windows come from order statistics"
    return np.sort(
        np.concatenate(
            [np.empty(0, np.int64), *(source.equal[_bits_of_float(v)][j0:j1] for v, j0, j1 in cut.windows)]
        )
    )


#: tensors up to this many entries keep their magnitudes' high halves between the two passes
_KERNEL_HIGH_STORE = 1 << 23

_KERNEL_PARTS = (KeepAll, TopK, Window, Threshold, RandomKeep, RankKeep)


def _kernel_merge(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    parts: Sequence[Sparsifier],
    weight: Sequence[float],
    elect: bool,
    normalize: bool,
    lambda_: float,
    unweighted_vote: bool,
    block: int | None,
) -> torch.Tensor | None:
    """``gta_merge`` through the C kernels, or None where they do not apply: they cover
    float32 on CPU, keep-all parts, magnitude cuts (``tie_break="index"``), flat random
    drops and DELLA's ranked drops (rows along the last of 2 dims) with any rescale, the
    weighted vote, and the default block size. The same bytes
    as the torch blocks, except that a norm rescale's factor is a float64 sum in another
    order (it can differ in the last bit)."""
    if not _kernels.available() or block is not None or unweighted_vote or not parts:
        return None
    for part in parts:
        if type(part) not in _KERNEL_PARTS:
            return None
        if isinstance(part, _CutSparsifier) and part.tie_break != "index":
            return None
        if isinstance(part, RankKeep) and (part.inner != 1 or part.row >= 1 << 32):
            return None  # rows along dim 1 of a tensor with 3+ dims are strided: the torch path
    flat = _kernels.float32_arrays([base, *xs])
    if flat is None:
        return None
    for i, x in enumerate(xs):
        _check_shape(i, x, base)
    b, x_arrays = flat[0], flat[1:]
    n_models = len(parts)
    rules = np.zeros((n_models, 8), dtype=np.int64)
    rules[:, _kernels.R_LO], rules[:, _kernels.R_HI] = -1, _kernels.NONE_HIGH
    scale = np.ones((n_models, 5), dtype=np.float32)
    scale[:, _kernels.S_WEIGHT] = weight
    kept: list[np.ndarray] = []
    masks: list[np.ndarray | None] = [None] * n_models
    norm_passes: list[tuple[int, _kernels.NormPass]] = []
    count = 0
    high = None
    for i, part in enumerate(parts):
        rule = rules[i]
        positions = np.empty(0, np.int64)
        if isinstance(part, RandomKeep):
            rule[_kernels.R_MODE] = _kernels.KEEP_RANDOM
            rule[_kernels.R_SEED] = _int64(part.seed)
        elif isinstance(part, RankKeep):
            rule[_kernels.R_MODE] = _kernels.KEEP_RANK
            rule[_kernels.R_SEED] = _int64(part.seed)
            rule[_kernels.R_ROW] = part.row
            scale[i, _kernels.S_LOW] = part.density - part.epsilon
            scale[i, _kernels.S_SPAN] = 2 * part.epsilon
        elif isinstance(part, Threshold):
            positions = _kernel_cut(part.cut, None, rule)
        elif isinstance(part, _CutSparsifier):
            # the high halves are kept (2 bytes/entry, shared: the models' statistics run one
            # after another) unless the tensor is large: then the bucket scan recomputes them,
            # which bounds the memory of embedding-sized tensors
            if high is None and b.size <= _KERNEL_HIGH_STORE:
                high = new_empty((b.size,), torch.int16).numpy().view(np.uint16)
            source = KernelMagnitudes(x_arrays[i], b, high)
            positions = _kernel_cut(part.make_cut(source, b.size), source, rule)
        rule[_kernels.R_KEPT0], rule[_kernels.R_KEPT1] = count, count + positions.size
        kept.append(positions)
        count += positions.size
        if type(part) is not KeepAll:
            scale[i, _kernels.S_P] = part.density
        if part.rescale == "inverse_density":
            rule[_kernels.R_RESCALE] = _kernels.RESCALE_DIVIDE
        elif part.rescale in ("l1", "l2", "linf"):
            mask = None
            if isinstance(part, RankKeep):  # ranks once: the norm pass keeps its decisions (1 bit each)
                mask = new_empty((_kernels.mask_bytes(b.size),), torch.uint8).numpy()
                masks[i] = mask
            norm_passes.append(
                (
                    i,
                    _kernels.NormPass(x_arrays[i], b, rule, scale[i].copy(), positions, part.rescale, mask),
                )
            )
    # the models' norm passes are independent: their ranges spread over the cores
    norms = _kernels.keep_norms([one for _, one in norm_passes])
    for (i, _), (before, after) in zip(norm_passes, norms):
        if masks[i] is not None:
            rules[i, _kernels.R_MODE] = _kernels.KEEP_MASK
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            rules[i, _kernels.R_RESCALE] = _kernels.RESCALE_FACTOR
            scale[i, _kernels.S_FACTOR] = before / after
    total = float(MergeScratch(weight, 1, torch.float32, base.device).total)
    out = new_empty(base.shape, torch.float32)
    all_kept = np.concatenate([np.empty(0, np.int64), *kept])
    _kernels.cut_merge(
        x_arrays, b, out.view(-1).numpy(), rules, all_kept, scale, weight, masks=masks,
        elect=elect, normalize=normalize, total=total, lam=lambda_,
    )  # fmt: skip
    return out


class MergeScratch:
    """Buffers of one blockwise merge: weights as a column, sums, signs, agreement."""

    def __init__(self, weight: Sequence[float], size: int, dtype: torch.dtype, device: torch.device):
        n = len(weight)
        self.w = torch.tensor(list(weight), dtype=dtype, device=device).view(n, 1)
        self.positive = bool((self.w > 0).all())
        self.total = self.w.sum()
        if self.total.abs() < 1e-8:
            self.total = torch.ones((), dtype=dtype, device=device)
        self.sum = torch.empty(size, dtype=dtype, device=device)
        self.div = torch.empty(size, dtype=dtype, device=device)
        self.sign = torch.empty(size, dtype=dtype, device=device)
        self.ones = torch.ones(size, dtype=dtype, device=device)
        self.agree = torch.empty((n, size), dtype=dtype, device=device)


def merge_block(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    s: MergeScratch,
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    votes: torch.Tensor | None = None,
) -> None:
    """out = base + lambda * sum_i m_i w_i delta_i [/ D] on one block; ``deltas`` (n, L) is consumed.

    Without election m_i = 1 and D = sum_i w_i (|D| < 1e-8 becomes 1). With election the
    sign s = +1 where sum_i v_i >= 0 else -1, with v_i the vote inputs (by default the
    weighted deltas u_i = w_i delta_i; ``votes`` stacks others, e.g. the unweighted deltas),
    m_i = [sign(v_i) == s] (zeros never agree), D = sum_i m_i w_i (D == 0 becomes 1).
    ``normalize`` divides by D; lambda multiplies last. mergekit's operations in its order,
    so the values match it bit for bit (up to the sign of a zero).

    Float ops only: m_i = sign(relu(s v_i)); the agreeing sum is s * sum_i relu(s u_i) when
    the vote is on u itself (exact: every agreeing u_i has sign s). A sum of -0 (all votes
    zero) gives s = -1 instead of +1, which changes nothing since no zero agrees.
    """
    n = out.numel()
    deltas.mul_(s.w)  # u_i = w_i delta_i
    mixed = s.sum[:n]
    if elect:
        sign, agree = s.sign[:n], s.agree[:, :n]
        torch.sum(deltas if votes is None else votes, dim=0, out=mixed)
        torch.copysign(s.ones[:n], mixed, out=sign)  # the elected sign
        if votes is None:
            torch.mul(deltas, sign, out=agree).relu_()  # |u_i| where u_i agrees, else 0
            torch.sum(agree, dim=0, out=mixed).mul_(sign)
        else:
            torch.mul(votes, sign, out=agree).relu_()
            torch.sum(deltas.mul_(agree.sign_()), dim=0, out=mixed)
        divisor = torch.sum(agree.sign_().mul_(s.w), dim=0, out=s.div[:n])  # sum_i m_i w_i
        if s.positive:  # D == 0 only where nothing agrees (mixed = 0): any non-zero divisor does
            divisor.clamp_min_(torch.finfo(divisor.dtype).tiny)
        else:
            divisor.masked_fill_(divisor == 0, 1)
    else:
        torch.sum(deltas, dim=0, out=mixed)
        divisor = s.total
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    torch.add(base, mixed, out=out)


def merge_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    votes: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """``merge_block`` over already stacked task vectors ``deltas`` (consumed), block by block."""
    out = torch.empty_like(base)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_deltas = deltas.reshape(deltas.shape[0], -1)
    flat_votes = votes.reshape(votes.shape[0], -1) if votes is not None else None
    size = max(1, min(default_block(base.device) if block is None else block, flat_base.numel()))
    scratch = MergeScratch(weight, size, base.dtype, base.device)
    for a in range(0, flat_base.numel(), size):
        z = slice(a, a + size)
        merge_block(
            flat_out[z],
            flat_base[z],
            flat_deltas[:, z],
            scratch,
            elect=elect,
            normalize=normalize,
            lambda_=lambda_,
            votes=flat_votes[:, z] if flat_votes is not None else None,
        )
    return out


# ---------------------------------------------------------------------------------------------
# One tensor at a time (the building blocks above, for callers and tests holding one tau)
# ---------------------------------------------------------------------------------------------


def sparsify(tau: torch.Tensor, part: Sparsifier, block: int | None = None) -> torch.Tensor:
    """``part`` applied to one task vector (as ``gta_merge`` applies it), in tau's dtype."""
    zero = torch.zeros_like(tau)
    size = default_block(tau.device) if block is None else block
    tv = TaskVectors([tau], zero, max(part.unit, size // part.unit * part.unit))
    part.fit(tv, 0)
    part.norm_pass(tv, 0)
    part.begin()
    out = torch.empty_like(tau)
    flat = out.view(-1)
    for a, b in tv.spans():
        part.into(tv, 0, a, b, flat[a:b])
    return out


def _mask_of(tau: torch.Tensor, part: _CutSparsifier) -> torch.Tensor:
    tv = TaskVectors([tau], torch.zeros_like(tau), default_block(tau.device))
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
