"""Pin glibc's mmap threshold, so memory the model frees goes back to the kernel instead of the heap.

glibc serves allocations above its mmap threshold (128 KiB at start) with their own mappings, returned to
the kernel on free. But the threshold is dynamic: each time such a block is freed, it rises to that
block's size (up to 32 MiB). After the first long prefill, the activation blocks of every later one come
from the heap, and the heap keeps its high-water mark: the server's resident memory then depends on the
longest history it ever rebuilt, which is what a bounded decode state is meant to prevent. Setting the
threshold explicitly turns the dynamic adjustment off (as MALLOC_MMAP_THRESHOLD_ in the environment does;
bench/serve.py measures the memory growth with and without it: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

# mallopt(3) parameter number of M_MMAP_THRESHOLD in glibc's <malloc.h>.
_M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold at `threshold_bytes`; True when applied.

    Does nothing (False) when the threshold is 0 (keep glibc's dynamic default), when the operator set
    MALLOC_MMAP_THRESHOLD_ in the environment (glibc already applied theirs), or off glibc.
    """
    if threshold_bytes <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt), or no C library to load
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    if not applied:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused; keeping glibc's default", threshold_bytes)
    return applied
