"""Process-wide memory settings for flctl's long-running processes (serve, join)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

__all__ = ["return_large_buffers"]

#: glibc's mallopt parameter for the size above which allocations get their own mapping.
_M_MMAP_THRESHOLD = -3
#: 128 KiB: transfer chunks (1 MiB) and tensors then come from mappings returned to the system
#: when freed, instead of heaps glibc keeps after each transfer and aggregation.
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_large_buffers(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make freed large buffers go back to the system at once (glibc only; else a no-op).

    By default glibc raises its mmap threshold as large blocks are freed and then serves chunk
    buffers and mid-size tensors from heaps it rarely trims: a coordinator's peak memory then
    climbs with every upload and aggregation. Fixing the threshold keeps it flat.

    Returns:
        Whether the setting was applied.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    return False
