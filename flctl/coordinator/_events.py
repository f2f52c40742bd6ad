"""The coordinator's event log: persisted in the store, fanned out to live followers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flctl.core.events import Event
from flctl.store import SqlStore

__all__ = ["EventLog"]

log = logging.getLogger("flctl.coordinator")


class EventLog:
    """Appends events to the store and wakes whoever follows the log.

    In-process listeners (the ``serve`` panel) are called synchronously with each event; remote
    followers (``Watch``) wait on :meth:`wait_beyond` and read the store.
    """

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[Event], None]] = []
        self.last_seq = store.last_event_seq()
        self.closed = False

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event emitted from now on."""
        self._listeners.append(listener)

    def emit(
        self,
        type: str,
        *,
        server_round: int = 0,
        client_id: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        """Persist one event and wake followers."""
        event = self._store.append_event(
            type, server_round=server_round, client_id=client_id, data=data or {}
        )
        self.last_seq = event.seq
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken panel must not break the coordinator
                log.exception("event listener failed")
        self._wake()
        return event

    def _wake(self) -> None:
        # Swap in a fresh Event: waiters hold the old one, which stays set.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Wake every follower for the last time (the coordinator is stopping)."""
        self.closed = True
        self._wake()

    async def wait_beyond(self, seq: int, timeout: float) -> bool:
        """Wait until an event after ``seq`` exists; return False on timeout or close."""
        while self.last_seq <= seq and not self.closed:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except TimeoutError:
                return False
        return self.last_seq > seq
