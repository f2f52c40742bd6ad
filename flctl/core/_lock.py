"""Advisory locks on the state folder that say who holds them (standard library only).

Two locks (``fcntl.flock``, released by the kernel when their holder exits):

- ``coordinator.lock`` is held by a running coordinator, from its start until it stops, and by
  nothing else that records itself in it. That it is held is the coordinator's own record that
  it runs; its ``serve.json`` then says where it listens.
- ``state.lock`` is held by whatever writes the state folder without a coordinator: an offline
  command (``models rollback``, ``tag``, ``import``, ``gc``, ``certs revoke``) for as long as
  it writes, and a starting coordinator for the moment it takes ``coordinator.lock``. Writers
  queue on it, one after the other.

The holder writes what it is (its command, pid and since when) into the lock file while it
holds it, so that those waiting can say who they wait for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

__all__ = [
    "COORDINATOR_LOCK",
    "STATE_LOCK",
    "LockHolder",
    "read_holder",
    "try_lock",
]

#: Held by a running coordinator for as long as it runs.
COORDINATOR_LOCK = "coordinator.lock"
#: Held by an offline command while it writes the state folder, and by a starting coordinator.
STATE_LOCK = "state.lock"


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the process that holds it.

    Attributes:
        command: What holds it, e.g. ``models tag`` or ``serve``.
        pid: Its process id.
        since: When it took the lock (Unix time).
    """

    command: str
    pid: int | None
    since: float | None

    def describe(self) -> str:
        """``flctl models gc (pid 4242, since 12:03:04)``, in the words of an error message."""
        parts = [] if self.pid is None else [f"pid {self.pid}"]
        if self.since is not None:
            parts.append(f"since {datetime.fromtimestamp(self.since):%H:%M:%S}")
        where = f" ({', '.join(parts)})" if parts else ""
        return f"flctl {self.command}{where}"


def try_lock(path: Path, command: str | None = None) -> IO[str] | None:
    """Take the lock at ``path`` without waiting; None when another process holds it.

    Args:
        path: The lock file (created if missing; never truncated unless we hold it).
        command: What we are, written into the file with our pid and the time; None leaves
            the file as it is.

    Returns:
        The open lock file: closing it releases the lock.

    Raises:
        OSError: The file cannot be opened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a", not "w": never truncate a file another process holds
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    if command is not None:
        record = {"command": command, "pid": os.getpid(), "since": time.time()}
        try:
            handle.truncate(0)
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        except OSError:  # a full disk: the lock holds all the same, only unnamed
            pass
    return handle


def read_holder(path: Path) -> LockHolder | None:
    """What the lock file at ``path`` says about its holder; None if it says nothing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("command"), str):
        return None
    pid, since = data.get("pid"), data.get("since")
    return LockHolder(
        command=data["command"],
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        since=float(since) if isinstance(since, int | float) else None,
    )
