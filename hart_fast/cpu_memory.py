"""Keep freed CPU memory in the process, so a batch's large tensors reuse pages.

glibc's malloc serves a large allocation with its own mmap and unmaps it on free
(and returns a freed top of the heap to the kernel past a threshold), so every
generate call at a large batch faults in, and the kernel zeroes, its activations
again (at batch 1 they stay in the heap; measured in BENCHMARKS.md, "CPU memory:
freed pages"). `keep_freed_memory` raises glibc's mmap threshold to its largest
value (32 MB on 64-bit) and its trim threshold, so such tensors
come from the heap and a freed one stays mapped for the next call. The results
are unchanged (only where the bytes live); the process keeps up to the trim
threshold of freed memory mapped.

The setting is the process's (malloc has one), so the library leaves it to the
processes hart_fast owns: the `hart-fast` command (generate, batch, serve) and
the Ray batch workers call it; a program that imports hart_fast may call it
too. HART_FAST_MALLOC=default leaves glibc's own. On other C libraries and
systems it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20   # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: glibc refuses more
TRIM_THRESHOLD = 512 * 2**20

_applied: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Apply the malloc settings above once per process; whether they are in force."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("HART_FAST_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]
