"""Keep glibc from holding on to freed activation memory during CPU training.

A TTT step allocates and frees hundreds of MB of activations. glibc's malloc raises its mmap
threshold dynamically after such frees, so later large blocks come from the heap and freed
memory stays in the process: peak RSS grows by the size of one step's activations. Pinning the
threshold keeps large blocks on mmap, which returns them to the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["pin_malloc_mmap_threshold"]

_M_MMAP_THRESHOLD = -3  # from <malloc.h>


def pin_malloc_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of at least ``threshold_bytes`` with mmap. Returns False where the C
    library is not glibc (nothing changes then)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
