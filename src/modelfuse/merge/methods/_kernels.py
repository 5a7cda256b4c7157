"""Compiled CPU kernels for the sparsifying merges: the same arithmetic as the torch blocks
in ``_sparsify``, fused into one pass per step.

Torch runs each elementwise step of a block as its own pass (subtract, abs, compare, mask,
multiply, sum, sign, ...), about twenty per model and block. These kernels (C, in
``_ckernels.c``, built by setup.py as an optional extension and called through ctypes) do
the same IEEE float32 operations in the same order per entry inside one loop over
cache-sized blocks, so they give the same bytes as the torch path (the tests compare both)
at a fraction of the memory traffic. Used for float32 tensors on CPU when the extension was
built; everything else (other dtypes, GPUs, random drops, norm rescales) runs the torch path.

Kernels:

- ``magnitude_highs``: the high 16 bits of |x - base| (float32 bit patterns) into a
  uint16 store, and their histogram: the first level of the radix select.
- ``bucket_entries``: the entries whose high bits are one bucket, as (bits, position),
  in position order: the second level, and the positions that resolve ties.
- ``cut_merge``: the merge of ``merge_block`` with each model's task vector cut by
  magnitude bounds and kept positions.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from collections.abc import Sequence

import numpy as np

_HIGH = 1 << 15  # buckets of the high 16 bits of a non-negative float32
NONE_HIGH = 1 << 33  # a bound above every 32-bit pattern
#: columns of a model's rules row (int64) and scale row (float32), as in _ckernels.c
R_LO, R_HI, R_MODE, R_KEPT0, R_KEPT1, R_SEED, R_RESCALE = range(7)
S_WEIGHT, S_P, S_FACTOR = range(3)
KEEP_ALL, KEEP_CUT, KEEP_RANDOM = 0, 1, 3
RESCALE_NONE, RESCALE_DIVIDE, RESCALE_FACTOR = 0, 1, 2
NORM_KIND = {"l1": 1, "l2": 2, "linf": 3}
_SPEC = importlib.util.find_spec("modelfuse.merge.methods._ckernels")
_ENABLED = _SPEC is not None and os.environ.get("MODELFUSE_KERNELS", "1") != "0"
_library: ctypes.CDLL | None = None
_lock = threading.Lock()

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "mf_magnitude_highs": (None, [_P, _P, _I64, _P, _P]),
    "mf_bucket_entries": (_I64, [_P, _P, _P, _I64, _I64, _P, _P, _I64]),
    "mf_keep_norms": (None, [_P, _P, _I64, _P, _P, ctypes.c_float, ctypes.c_int, _P]),
    "mf_cut_merge": (
        ctypes.c_int,
        [_P, _I64, _P, _I64, _P, _P, _P, _P, _P, *[ctypes.c_int] * 3, *[ctypes.c_float] * 2],
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


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check(a: np.ndarray, dtype: type, name: str) -> None:
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"{name}: expected a contiguous {np.dtype(dtype)} array, found {a.dtype}")


def magnitude_highs(x: np.ndarray, base: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Fill ``high`` (uint16) with the high halves of |x - base|'s float32 bits; return their
    histogram (int64, 2^15 buckets: the sign bit is clear)."""
    for a, dtype, name in ((x, np.float32, "x"), (base, np.float32, "base"), (high, np.uint16, "high")):
        _check(a, dtype, name)
    if not x.size == base.size <= high.size:
        raise ValueError(f"sizes: x {x.size}, base {base.size}, high {high.size}")
    hist = np.zeros((2, _HIGH), np.int64)
    _lib().mf_magnitude_highs(_ptr(x), _ptr(base), base.size, _ptr(high), _ptr(hist))
    return hist.sum(axis=0)


def bucket_entries(
    x: np.ndarray, base: np.ndarray, high: np.ndarray, bucket: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(bits, positions) of the ``count`` entries whose high half is ``bucket``, in position order."""
    bits = np.empty(count, np.uint32)
    where = np.empty(count, np.int64)
    found = _lib().mf_bucket_entries(
        _ptr(x), _ptr(base), _ptr(high), base.size, int(bucket), _ptr(bits), _ptr(where), count
    )
    if found != count:
        raise RuntimeError(f"bucket {bucket}: the histogram counted {count} entries, the scan found {found}")
    return bits, where


def keep_norms(
    x: np.ndarray, base: np.ndarray, rule: np.ndarray, kept: np.ndarray, p: float, kind: str
) -> tuple[float, float]:
    """(norm of tau, norm of its kept part) for one model's ``rule`` (a rules row, see
    ``cut_merge``; ``kept``: its positions alone): ``kind`` "l1", "l2" (the norm, not its
    square) or "linf"; float64 sums."""
    for a, dtype, name in ((x, np.float32, "x"), (base, np.float32, "base"), (rule, np.int64, "rule")):
        _check(a, dtype, name)
    _check(kept, np.int64, "kept")
    rule = rule.copy()
    rule[R_KEPT0], rule[R_KEPT1] = 0, kept.size  # ``kept``: this model's positions only
    norms = np.zeros(2, np.float64)
    _lib().mf_keep_norms(
        _ptr(x),
        _ptr(base),
        base.size,
        _ptr(rule),
        _ptr(kept),
        float(np.float32(p)),
        NORM_KIND[kind],
        _ptr(norms),
    )
    if kind == "l2":
        norms = np.sqrt(norms)
    return float(norms[0]), float(norms[1])


def cut_merge(
    xs: Sequence[np.ndarray],
    base: np.ndarray,
    out: np.ndarray,
    rules: np.ndarray,
    kept: np.ndarray,
    scale: np.ndarray,
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    total: float,
    lam: float,
) -> None:
    """``merge_block`` over whole float32 tensors (``xs``: 1-d arrays). Model i's task vector
    is kept per ``rules[i]`` (int64; columns R_*): ``R_MODE`` KEEP_ALL; KEEP_CUT, the entries
    whose float32 magnitude bits b have ``R_LO < b < R_HI`` plus the positions
    ``kept[R_KEPT0:R_KEPT1]`` (ascending); KEEP_RANDOM, where ``uniform(R_SEED, j) <
    scale[i, S_P]``. ``R_RESCALE``: none, divide by ``scale[i, S_P]``, or multiply by
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
    if out.size != base.size or rules.shape != (n_models, 7) or scale.shape != (n_models, 3):
        raise ValueError(
            f"shapes: out {out.shape}, rules {rules.shape}, scale {scale.shape} for {n_models} models"
        )
    if n_models and (
        rules[:, 3].min() < 0 or rules[:, 4].max() > kept.size or (rules[:, 3] > rules[:, 4]).any()
    ):
        raise ValueError("rules: kept ranges outside the kept array")
    if kept.size and (kept.min() < 0 or kept.max() >= base.size):
        raise ValueError("kept: positions outside the tensor")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    pointers = (ctypes.c_void_p * max(1, n_models))(*[_ptr(x) for x in xs])
    status = _lib().mf_cut_merge(
        pointers,
        n_models,
        _ptr(base),
        base.size,
        _ptr(out),
        _ptr(rules),
        _ptr(kept),
        _ptr(scale),
        _ptr(w),
        int(bool(elect)),
        int(bool(normalize)),
        int(bool((w > 0).all())),
        float(np.float32(total)),
        float(np.float32(lam)),
    )
    if status != 0:
        raise MemoryError("cut_merge: out of memory for its block buffers")
