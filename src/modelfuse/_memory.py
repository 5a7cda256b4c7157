"""Hand freed heap memory back to the system before a streaming process's peak, on glibc.

A streaming merge maps its safetensors inputs and keeps outputs and other reads in reused
buffers (``merge.executor.BufferPool``), so they cost no fresh pages. What glibc's heap
keeps after other temporaries are freed stays resident, though, and would add to the peak
that comes with the largest tensors (embeddings, output heads). ``release_free_memory``
calls ``malloc_trim(0)`` before such a tensor.

(An earlier version fixed glibc's mmap threshold at 1 MiB so that every tensor-sized block
went back to the system on free; with reads pooled, that only made each temporary cost
fresh, zero-filled pages: a linear merge of 4 x 0.88 GB took 4.0-5.0 s with it and 2.3-3.0 s
without, for 50-110 MiB more peak RSS. See benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only: musl has none)
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Return the heap's free memory to the system (glibc ``malloc_trim``); False where unavailable."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
