"""Keep a streaming process's resident memory bounded by what it holds, on glibc.

glibc serves allocations below its mmap threshold from per-thread arenas and raises that
threshold (up to 32 MiB) as large blocks are freed, so tensors of a few MiB read on
several threads stay resident after they are freed: RSS creeps towards the model's size.
A fixed 1 MiB threshold sends every tensor-sized block to mmap, returned to the system on
free. Measured on a 4 x 0.85 GB linear merge: peak RSS 1.9 GB -> 1.3 GB, and faster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3


@functools.cache
def bound_malloc(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold for this process (once); False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
