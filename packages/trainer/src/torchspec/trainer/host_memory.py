"""Host memory policy of a CPU training process.

A TTT step allocates and frees hundreds of MB of activations. glibc's malloc raises its mmap
threshold after such frees (up to 32 MiB), so later large blocks come from the heap, and freed heap
memory stays in the process: peak RSS grows by about one step's activations. Pinning the threshold
keeps blocks of 1 MiB and more on mmap, which returns them to the OS when freed. The trainer applies
it to CPU runs (``Trainer``); it is a process-wide setting, so the model library never does.
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
