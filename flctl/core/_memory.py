"""Process-wide memory settings for flctl's long-running processes (serve, join)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

__all__ = ["return_large_buffers"]

#: glibc's mallopt parameters: the size above which an allocation gets its own mapping, and
#: the free space at the top of a heap above which the heap is shrunk.
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8
#: 4 MiB: tensors above it come from mappings returned to the system when freed, instead of
#: heaps glibc keeps after each transfer and aggregation.
MMAP_THRESHOLD_BYTES = 4 << 20
#: 16 MiB: the 1 MiB transfer buffers (a few in flight per transfer) are reused from the heap
#: instead of being mapped, faulted in page by page and unmapped for every chunk.
TRIM_THRESHOLD_BYTES = 16 << 20
#: 2 heaps at most: each thread that allocates would otherwise get its own (up to 8 per core),
#: each keeping its free transfer buffers, so peak memory grew with the number of clients.
ARENA_MAX = 2


def return_large_buffers(
    threshold: int = MMAP_THRESHOLD_BYTES,
    trim: int = TRIM_THRESHOLD_BYTES,
    arenas: int = ARENA_MAX,
) -> bool:
    """Make freed large buffers go back to the system at once (glibc only; else a no-op).

    By default glibc raises its mmap threshold (up to 32 MiB) as large blocks are freed and
    then serves mid-size tensors from heaps it rarely trims: a coordinator's peak memory then
    climbs with every upload and aggregation. Fixing the threshold keeps it flat. The trim
    threshold is fixed with it, above the transfer buffers' churn: with glibc's 128 KiB
    default, every 1 MiB chunk would grow and shrink the heap (a page fault per 4 KiB: about
    20 times the cost of copying the chunk). Call it at start, before threads allocate.

    Returns:
        Whether the settings were applied.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        settings = (
            (_M_MMAP_THRESHOLD, threshold),
            (_M_TRIM_THRESHOLD, trim),
            (_M_ARENA_MAX, arenas),
        )
        applied = [libc.mallopt(param, value) for param, value in settings]  # each one, always
        return all(applied)
    return False
