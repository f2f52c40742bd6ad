"""Connected clients: one session each, with the queue its task stream reads from."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from flctl.core.work import Task

__all__ = ["Registry", "Session"]


@dataclass
class Session:
    """One client's session, from Join until its task stream ends or it joins again."""

    client_id: str
    session_id: str
    fingerprint: str
    serial: int = 0
    queue: asyncio.Queue[Task | None] = field(default_factory=asyncio.Queue)
    streaming: bool = False
    state: str = "idle"
    progress: float = 0.0
    bytes_per_s: float = 0.0
    last_seen: float = field(default_factory=time.time)
    failed_round: int = 0
    #: Why the task of ``failed_round`` failed, as the client said it (one line).
    failure: str = ""
    revoked: bool = False
    #: The joining process's random id: the same process may join again, another may not.
    instance_id: str = ""
    #: When the client's certificate expires (seconds since the epoch; 0: no certificate).
    not_after: float = 0.0
    #: Ended because the certificate expired (its open streams end refused, saying so).
    expired: bool = False


class Registry:
    """Sessions by client id; the round engine selects from those whose stream is open."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self.changed = asyncio.Event()

    def notify(self) -> None:
        """Wake whoever waits for the set of connected clients to change."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def add(self, session: Session) -> Session | None:
        """Register ``session``; return the session it replaces, if any."""
        old = self._sessions.get(session.client_id)
        self._sessions[session.client_id] = session
        if old is not None:
            old.queue.put_nowait(None)  # end the old task stream
        self.notify()
        return old

    def end(self, session: Session, *, revoked: bool = False) -> bool:
        """Drop ``session`` and end its task stream; False if it was not the current one."""
        session.revoked = session.revoked or revoked
        session.queue.put_nowait(None)
        return self.remove(session)

    def get(self, client_id: str) -> Session | None:
        """The client's current session."""
        return self._sessions.get(client_id)

    def remove(self, session: Session) -> bool:
        """Drop ``session`` if it is still the client's current one."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
            self.notify()
            return True
        return False

    def items(self) -> list[tuple[str, Session]]:
        """Every session, by client id."""
        return sorted(self._sessions.items())

    def connected(self) -> list[Session]:
        """Sessions whose task stream is open, by client id."""
        return sorted(
            (s for s in self._sessions.values() if s.streaming), key=lambda s: s.client_id
        )

    def close_all(self) -> None:
        """End every task stream."""
        for session in self._sessions.values():
            session.queue.put_nowait(None)
