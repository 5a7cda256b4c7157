"""Cuts by magnitude: a radix select of order statistics over float32 magnitudes.

TIES' top-k and breadcrumbs' window keep entries by the rank of their float32 magnitude.
Ranks are found by a two-level radix select (non-negative floats order like their bit
patterns: a histogram of the high 16 bits, then the low 16 bits of the few entries in the
chosen bucket), in linear time over blocks, with the counts of equal values for free.
``MagnitudeCut`` turns the result into per-block keep masks; equal magnitudes that a cut
splits are kept by position (a stable sort's order, ``tie_break="index"``).
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch


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


_HIGH = 1 << 15  # buckets of the high 16 bits of a non-negative float32 (sign bit clear)
_LOW = 1 << 16


def _float_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _bits_of_float(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


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
