"""Whether a process named by its pid still runs (standard library only)."""

from __future__ import annotations

import os

__all__ = ["process_alive"]


def process_alive(pid: object) -> bool:
    """Whether ``pid`` names a live process (one owned by another user counts as alive)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
