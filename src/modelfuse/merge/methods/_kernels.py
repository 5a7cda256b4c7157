"""Compiled CPU kernels for the sparsifying merges: the same arithmetic as the torch blocks
in ``_engine`` and ``_sparsifiers``, fused into one pass per step.

Torch runs each elementwise step of a block as its own pass (subtract, abs, compare, mask,
multiply, sum, sign, ...), about twenty per model and block. These kernels (C, in
``_ckernels.c``, built by setup.py as an optional extension and called through ctypes) do
the same IEEE float32 operations in the same order per entry inside one loop over
cache-sized blocks, so they give the same bytes as the torch path (the tests compare both)
at a fraction of the memory traffic. Used for float32 tensors on CPU when the extension was
built; everything else (other dtypes, GPUs, the sort tie order, the unweighted vote) runs
the torch path.

Kernels:

- ``magnitude_highs``: the high 16 bits of |x - base| (float32 bit patterns) into a
  uint16 store, and their histogram: the first level of the radix select.
- ``bucket_entries``: the entries whose high bits are one bucket, as (bits, position),
  in position order: the second level, and the positions that resolve ties.
- ``NormPass`` / ``keep_norms``: a norm rescale's two norms (the task vector's and its kept
  part's), in ranges spread over the cores; for DELLA also its keep decisions as bits.
  DELLA's decisions mostly follow from coarse buckets of the magnitudes; only the few
  entries whose bucket straddles their draw are ranked exactly (``row_keep`` in the C file).
- ``cut_merge``: the merge of ``merge_block`` with each model's task vector cut by
  magnitude bounds and kept positions, drawn, ranked or masked.
- ``weighted_sum``, ``blend``, ``dots``, ``stock_blend``: linear, task arithmetic, SLERP and
  Model Stock.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

_HIGH = 1 << 15  # buckets of the high 16 bits of a non-negative float32
NONE_HIGH = 1 << 33  # a bound above every 32-bit pattern
#: columns of a model's rules row (int64) and scale row (float32), as in _ckernels.c
R_LO, R_HI, R_MODE, R_KEPT0, R_KEPT1, R_SEED, R_RESCALE, R_ROW = range(8)
S_WEIGHT, S_P, S_FACTOR, S_LOW, S_SPAN = range(5)
KEEP_ALL, KEEP_CUT, KEEP_RANDOM, KEEP_RANK, KEEP_MASK = 0, 1, 3, 4, 5
#: entries per kernel block (a multiple of the row length for ranked drops)
KBLOCK = 2048
RESCALE_NONE, RESCALE_DIVIDE, RESCALE_FACTOR = 0, 1, 2
NORM_KIND = {"l1": 1, "l2": 2, "linf": 3}
#: entries per range of a norm pass (rounded to whole blocks of 8 blocks): ranges run on
#: several threads, and their sums are added in range order, so the size is fixed here,
#: not by the number of cores
NORM_RANGE = 1 << 20
_SPEC = importlib.util.find_spec("modelfuse.merge.methods._ckernels")
_ENABLED = _SPEC is not None and os.environ.get("MODELFUSE_KERNELS", "1") != "0"
_library: ctypes.CDLL | None = None
_lock = threading.Lock()

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "mf_magnitude_highs": (None, [_P, _P, _I64, _P, _P]),
    "mf_bucket_entries": (_I64, [_P, _P, _P, _I64, _I64, _I64, _P, _P, _I64]),
    "mf_dots": (None, [_P, _P, _I64, _P]),
    "mf_weighted_sum": (
        None,
        [_P, _I64, _P, _P, _P, ctypes.c_int, ctypes.c_float, ctypes.c_float, _I64, _I64],
    ),
    "mf_stock_blend": (None, [_P, _I64, _P, _P, ctypes.c_float, ctypes.c_float, _I64, _I64]),
    "mf_blend": (None, [_P, _P, _P, ctypes.c_double, ctypes.c_double, _I64, _I64]),
    "mf_keep_norms": (ctypes.c_int, [_P, _P, _I64, _P, _P, _P, ctypes.c_int, _I64, _P, _I64, _I64, _P]),
    "mf_cut_merge": (
        ctypes.c_int,
        [_P, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, *[ctypes.c_int] * 3, *[ctypes.c_float] * 2, *[_I64] * 3],
    ),
}


def available() -> bool:
    """True when the compiled kernels can run (the extension was built, and they are not
    switched off with ``MODELFUSE_KERNELS=0``)."""
    return _ENABLED


def set_enabled(flag: bool) -> bool:
    """Switch the kernels on or off (tests run both paths); returns the previous setting."""
    global _ENABLED
    before = _ENABLED
    _ENABLED = bool(flag) and _SPEC is not None
    return before


def _lib() -> ctypes.CDLL:
    """The kernels' shared library, loaded on first use (ctypes releases the GIL during calls)."""
    global _library
    with _lock:
        if _library is None:
            assert _SPEC is not None and _SPEC.origin is not None
            lib = ctypes.CDLL(_SPEC.origin)
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            _library = lib
        return _library


_pool: ThreadPoolExecutor | None = None


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parallel(jobs: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` (kernel calls: they release the GIL) on up to one thread per core; results in order."""
    global _pool
    if len(jobs) <= 1 or cores() <= 1:
        return [job() for job in jobs]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cores(), thread_name_prefix="modelfuse-kernel")
    return [f.result() for f in [_pool.submit(job) for job in jobs]]


def float32_arrays(tensors: Sequence[torch.Tensor]) -> list[np.ndarray] | None:
    """The tensors flattened to contiguous float32 NumPy arrays (views, no copies, for
    contiguous tensors) when the kernels apply to them: the kernels are available and every
    tensor is float32 on the CPU. Otherwise None: the caller runs its torch code."""
    if not available() or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    return [np.ascontiguousarray(t.detach().reshape(-1).numpy()) for t in tensors]


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check(a: np.ndarray, dtype: type, name: str) -> None:
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"{name}: expected a contiguous {np.dtype(dtype)} array, found {a.dtype}")


def magnitude_highs(x: np.ndarray, base: np.ndarray, high: np.ndarray | None) -> np.ndarray:
    """Fill ``high`` (uint16; None: keep nothing) with the high halves of |x - base|'s float32
    bits; return their histogram (int64, 2^15 buckets: the sign bit is clear)."""
    for a, dtype, name in ((x, np.float32, "x"), (base, np.float32, "base")):
        _check(a, dtype, name)
    if high is not None:
        _check(high, np.uint16, "high")
    if x.size != base.size or (high is not None and high.size < base.size):
        raise ValueError(f"sizes: x {x.size}, base {base.size}, high {None if high is None else high.size}")
    hist = np.zeros((2, _HIGH), np.int64)
    _lib().mf_magnitude_highs(
        _ptr(x), _ptr(base), base.size, None if high is None else _ptr(high), _ptr(hist)
    )
    return hist.sum(axis=0)


def bucket_entries(
    x: np.ndarray, base: np.ndarray, high: np.ndarray | None, buckets: Sequence[int], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(bits, positions) of the ``count`` entries whose high half is one of ``buckets`` (one or
    two), in position order: one scan for both ends of a window."""
    if not 1 <= len(buckets) <= 2:
        raise ValueError(f"one or two buckets, found {list(buckets)}")
    b1, b2 = int(buckets[0]), int(buckets[-1])
    bits = np.empty(count, np.uint32)
    where = np.empty(count, np.int64)
    found = _lib().mf_bucket_entries(
        _ptr(x),
        _ptr(base),
        None if high is None else _ptr(high),
        base.size,
        b1,
        b2,
        _ptr(bits),
        _ptr(where),
        count,
    )
    if found != count:
        raise RuntimeError(
            f"buckets {list(buckets)}: the histogram counted {count} entries, the scan found {found}"
        )
    return bits, where


def mask_bytes(n: int) -> int:
    """Bytes of a keep mask of n entries (one bit each)."""
    return (n + 7) // 8


def block_size(row: int = 1) -> int:
    """Entries per kernel block: about ``KBLOCK``, whole rows of ``row`` entries."""
    row = max(1, row)
    return row * max(1, KBLOCK // row)


class NormPass:
    """One model's norm pass: (norm of tau, norm of its kept part) for its ``rule`` and
    ``scale`` rows (see ``cut_merge``; ``kept``: its positions alone). ``kind``: "l1", "l2"
    (the norm, not its square) or "linf"; float64 sums. ``mask`` (uint8, (n + 7) // 8
    bytes): filled with the keep decisions, one bit per entry (position j: bit j % 8 of byte
    j // 8), for a KEEP_MASK merge that follows.

    ``jobs()`` cover ranges of about ``NORM_RANGE`` entries (to run on any threads, in any
    order); ``result`` adds their partial sums in range order, so the norms are the same
    bytes however the jobs ran."""

    def __init__(
        self,
        x: np.ndarray,
        base: np.ndarray,
        rule: np.ndarray,
        scale: np.ndarray,
        kept: np.ndarray,
        kind: str,
        mask: np.ndarray | None = None,
    ):
        for a, dtype, name in ((x, np.float32, "x"), (base, np.float32, "base"), (rule, np.int64, "rule")):
            _check(a, dtype, name)
        _check(scale, np.float32, "scale")
        _check(kept, np.int64, "kept")
        if x.size != base.size:
            raise ValueError(f"sizes: x {x.size}, base {base.size}")
        if mask is not None:
            _check(mask, np.uint8, "mask")
            if mask.size != mask_bytes(base.size):
                raise ValueError(
                    f"mask has {mask.size} bytes, the tensor's bits need {mask_bytes(base.size)}"
                )
        self.rule = rule.copy()
        self.rule[R_KEPT0], self.rule[R_KEPT1] = 0, kept.size  # ``kept``: this model's positions only
        self.arrays = (x, base, scale, kept, mask)
        self.kind = kind
        self.block = block_size(int(self.rule[R_ROW]))
        step = 8 * self.block * max(1, NORM_RANGE // (8 * self.block))
        self.ranges = [(a, min(a + step, base.size)) for a in range(0, base.size, step)] or [(0, 0)]

    def jobs(self) -> list[Callable[[], np.ndarray]]:
        """The ranges' kernel calls (made on demand: stored, they would make a reference
        cycle that keeps the input arrays, often mapped files, until a garbage collection)."""
        return [partial(self._lanes, a, b) for a, b in self.ranges]

    def _lanes(self, start: int, stop: int) -> np.ndarray:
        x, base, scale, kept, mask = self.arrays
        lanes = np.zeros(16, np.float64)
        status = _lib().mf_keep_norms(
            _ptr(x),
            _ptr(base),
            base.size,
            _ptr(self.rule),
            _ptr(scale),
            _ptr(kept),
            NORM_KIND[self.kind],
            self.block,
            None if mask is None else _ptr(mask),
            start,
            stop,
            _ptr(lanes),
        )
        if status != 0:
            raise MemoryError(f"keep_norms [{start}, {stop}): out of memory for its block buffers")
        return lanes

    def result(self, parts: Sequence[np.ndarray]) -> tuple[float, float]:
        """The norms from the jobs' results (in ``jobs()`` order)."""
        lanes = np.zeros(16, np.float64)
        for part in parts:  # range after range, lane by lane (np.maximum for linf)
            lanes = np.maximum(lanes, part) if self.kind == "linf" else lanes + part
        before = after = 0.0
        for k in range(8):  # then the lanes in order
            if self.kind == "linf":
                before, after = max(before, float(lanes[k])), max(after, float(lanes[8 + k]))
            else:
                before += float(lanes[k])
                after += float(lanes[8 + k])
        if self.kind == "l2":
            return float(np.sqrt(before)), float(np.sqrt(after))
        return before, after


def keep_norms(passes: Sequence[NormPass]) -> list[tuple[float, float]]:
    """Run norm passes together, their ranges spread over the cores; their norms in order."""
    jobs = [job for one in passes for job in one.jobs()]
    results = iter(parallel(jobs))
    return [one.result([next(results) for _ in one.ranges]) for one in passes]


def cut_merge(
    xs: Sequence[np.ndarray],
    base: np.ndarray,
    out: np.ndarray,
    rules: np.ndarray,
    kept: np.ndarray,
    scale: np.ndarray,
    weight: Sequence[float],
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    elect: bool,
    normalize: bool,
    total: float,
    lam: float,
) -> None:
    """``merge_block`` over whole float32 tensors (``xs``: 1-d arrays). Model i's task vector
    is kept per ``rules[i]`` (int64; columns R_*): ``R_MODE`` KEEP_ALL; KEEP_CUT, the entries
    whose float32 magnitude bits b have ``R_LO < b < R_HI`` plus the positions
    ``kept[R_KEPT0:R_KEPT1]`` (ascending); KEEP_RANDOM, where ``uniform(R_SEED, j) <
    scale[i, S_P]``; KEEP_RANK, where ``uniform(R_SEED, j) < p_j``, DELLA's probabilities
    ``(r / (n - 1)) * scale[i, S_SPAN] + scale[i, S_LOW]`` from the stable rank r of |tau| in
    rows of ``R_ROW`` entries; KEEP_MASK, where bit j of ``masks[i]`` is set (see ``keep_norms``).
    ``R_RESCALE``: none, divide by the keep probability, or multiply by
    ``scale[i, S_FACTOR]``; ``scale[i, S_WEIGHT]`` is the weight. The result goes to ``out``."""
    n_models = len(xs)
    for i, x in enumerate(xs):
        _check(x, np.float32, f"xs[{i}]")
        if x.size != base.size:
            raise ValueError(f"xs[{i}] has {x.size} entries, base {base.size}")
    for a, dtype, name in (
        (base, np.float32, "base"),
        (out, np.float32, "out"),
        (rules, np.int64, "rules"),
        (kept, np.int64, "kept"),
        (scale, np.float32, "scale"),
    ):
        _check(a, dtype, name)
    if out.size != base.size or rules.shape != (n_models, 8) or scale.shape != (n_models, 5):
        raise ValueError(
            f"shapes: out {out.shape}, rules {rules.shape}, scale {scale.shape} for {n_models} models"
        )
    if n_models and (
        rules[:, 3].min() < 0 or rules[:, 4].max() > kept.size or (rules[:, 3] > rules[:, 4]).any()
    ):
        raise ValueError("rules: kept ranges outside the kept array")
    if kept.size and (kept.min() < 0 or kept.max() >= base.size):
        raise ValueError("kept: positions outside the tensor")
    rows = {int(r[R_ROW]) for r in rules if r[R_MODE] == KEEP_RANK}
    if len(rows) > 1 or any(r < 1 for r in rows):
        raise ValueError(f"ranked drops need one row length >= 1, found {sorted(rows)}")
    mask_pointers = None
    if masks is not None:
        for i, m in enumerate(masks):
            if m is not None:
                _check(m, np.uint8, f"masks[{i}]")
                if m.size != mask_bytes(base.size):
                    raise ValueError(
                        f"masks[{i}] has {m.size} bytes, the tensor's bits need {mask_bytes(base.size)}"
                    )
        mask_pointers = (ctypes.c_void_p * max(1, n_models))(*[None if m is None else _ptr(m) for m in masks])
    if any(r[R_MODE] == KEEP_MASK and (masks is None or masks[i] is None) for i, r in enumerate(rules)):
        raise ValueError("a KEEP_MASK rule without its mask")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    pointers = (ctypes.c_void_p * max(1, n_models))(*[_ptr(x) for x in xs])
    blk = block_size(rows.pop() if rows else 1)
    # ranges of whole blocks, one per core when the tensor is large enough to be worth it
    n_blocks = -(-base.size // blk)
    parts = max(1, min(cores(), n_blocks, base.size // (1 << 18)))
    bounds = [i * n_blocks // parts * blk for i in range(parts)] + [base.size]
    args = (
        pointers,
        n_models,
        _ptr(base),
        base.size,
        _ptr(out),
        _ptr(rules),
        _ptr(kept),
        _ptr(scale),
        mask_pointers,
        _ptr(w),
        int(bool(elect)),
        int(bool(normalize)),
        int(bool((w > 0).all())),
        float(np.float32(total)),
        float(np.float32(lam)),
        blk,
    )
    fn = _lib().mf_cut_merge
    statuses = parallel([lambda a=a, b=b: fn(*args, a, b) for a, b in itertools.pairwise(bounds)])
    if any(statuses):
        raise MemoryError("cut_merge: out of memory for its block buffers")


def dots(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(<a, a>, <b, b>, <a, b>) of two float32 vectors, summed in float64."""
    _check(a, np.float32, "a")
    _check(b, np.float32, "b")
    if a.size != b.size:
        raise ValueError(f"a has {a.size} entries, b {b.size}")
    sums = np.zeros(3, np.float64)
    _lib().mf_dots(_ptr(a), _ptr(b), a.size, _ptr(sums))
    return float(sums[0]), float(sums[1]), float(sums[2])


def blend(a: np.ndarray, b: np.ndarray, out: np.ndarray, ca: float, cb: float) -> None:
    """out = float32(ca * float64(a) + cb * float64(b)), split over the cores for large vectors."""
    for x, name in ((a, "a"), (b, "b"), (out, "out")):
        _check(x, np.float32, name)
        if x.size != a.size:
            raise ValueError(f"{name} has {x.size} entries, a {a.size}")
    fn = _lib().mf_blend
    parts = max(1, min(cores(), a.size // (1 << 18)))
    bounds = [i * a.size // parts for i in range(parts + 1)]
    parallel(
        [
            lambda s=s, e=e: fn(_ptr(a), _ptr(b), _ptr(out), ca, cb, s, e)
            for s, e in itertools.pairwise(bounds)
        ]
    )


def stock_blend(xs: Sequence[np.ndarray], base: np.ndarray, out: np.ndarray, t: float) -> None:
    """Model Stock's output: out = t * mean(xs) + (1 - t) * base in float32 (the mean summed
    in model order), split over the cores for large tensors."""
    for i, x in enumerate([*xs, base, out]):
        _check(x, np.float32, f"array {i}")
        if x.size != base.size:
            raise ValueError(f"array {i} has {x.size} entries, base {base.size}")
    if not xs:
        raise ValueError("stock_blend needs at least one model")
    pointers = (ctypes.c_void_p * len(xs))(*[_ptr(x) for x in xs])
    fn = _lib().mf_stock_blend
    parts = max(1, min(cores(), base.size // (1 << 18)))
    bounds = [i * base.size // parts for i in range(parts + 1)]
    t32, u32 = float(np.float32(t)), float(np.float32(1 - t))
    parallel(
        [
            lambda s=s, e=e: fn(pointers, len(xs), _ptr(base), _ptr(out), t32, u32, s, e)
            for s, e in itertools.pairwise(bounds)
        ]
    )


def weighted_sum(
    xs: Sequence[np.ndarray],
    base: np.ndarray | None,
    out: np.ndarray,
    weight: Sequence[float],
    *,
    normalize: bool,
    div: float,
    lam: float = 1.0,
) -> None:
    """float32 weighted sums in model order: without ``base`` linear's sum_i w_i x_i [/ div];
    with it task arithmetic's (sum_i w_i (x_i - base) [/ div]) * lam + base. Split over the
    cores for large tensors."""
    arrays = [*xs, out] + ([] if base is None else [base])
    for i, x in enumerate(arrays):
        _check(x, np.float32, f"array {i}")
        if x.size != out.size:
            raise ValueError(f"array {i} has {x.size} entries, out {out.size}")
    if not xs or len(weight) != len(xs):
        raise ValueError(f"{len(xs)} models and {len(weight)} weights")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    pointers = (ctypes.c_void_p * len(xs))(*[_ptr(x) for x in xs])
    fn = _lib().mf_weighted_sum
    parts = max(1, min(cores(), out.size // (1 << 18)))
    bounds = [i * out.size // parts for i in range(parts + 1)]
    args = (
        pointers,
        len(xs),
        None if base is None else _ptr(base),
        _ptr(out),
        _ptr(w),
        int(bool(normalize)),
        float(np.float32(div)),
        float(np.float32(lam)),
    )
    parallel([lambda s=s, e=e: fn(*args, s, e) for s, e in itertools.pairwise(bounds)])
