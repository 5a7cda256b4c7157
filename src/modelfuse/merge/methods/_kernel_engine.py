"""``gta_merge`` through the compiled kernels (``_kernels``): the glue from the sparsifier
parts to the C kernels' rules, and the radix select through them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import new_empty
from modelfuse.merge.methods._random import _int64
from modelfuse.merge.methods._select import MagnitudeCut, _bits_of_float, _float_of_bits
from modelfuse.merge.methods._sparsifiers import (
    RESCALE_EPS,
    KeepAll,
    RandomKeep,
    RankKeep,
    Sparsifier,
    Threshold,
    TopK,
    Window,
    _CutSparsifier,
)
from modelfuse.merge.methods._task_vectors import _check_shape


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


def kernel_merge(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    parts: Sequence[Sparsifier],
    weight: Sequence[float],
    elect: bool,
    normalize: bool,
    lambda_: float,
    unweighted_vote: bool,
    block: int | None,
    total: float,
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
    out = new_empty(base.shape, torch.float32)
    all_kept = np.concatenate([np.empty(0, np.int64), *kept])
    _kernels.cut_merge(
        x_arrays, b, out.view(-1).numpy(), rules, all_kept, scale, weight, masks=masks,
        elect=elect, normalize=normalize, total=total, lam=lambda_,
    )  # fmt: skip
    return out
