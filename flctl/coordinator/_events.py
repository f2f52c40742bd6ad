"""The coordinator's event log: persisted in the store, fanned out to live followers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from flctl.core.events import Event, EventPayload
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
        # Every event reaches followers once its transaction commits, whoever wrote it: an
        # event written with the change it describes (``store.transaction()``) is announced
        # only if that change landed.
        store.on_events = self._published

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event emitted from now on."""
        self._listeners.append(listener)

    def emit(
        self,
        payload: EventPayload,
        *,
        server_round: int = 0,
        client_id: str = "",
        durable: bool = True,
    ) -> Event:
        """Persist one event; followers hear of it when its transaction commits.

        Called inside ``store.transaction()``, the event lands with the rest of that
        transaction's writes, or not at all. ``durable=False`` for the informational ones a
        client produces many times a round (state changes, tasks sent, sessions): their commit
        does not wait for the disk, they still survive a killed process.

        Args:
            payload: The event's typed payload (:class:`~flctl.core.events.EventPayload`):
                its type and its data.
            server_round: The round it concerns, or 0.
            client_id: The client it concerns, or "".
            durable: False for an event whose commit need not wait for the disk.
        """
        return self._store.append_event(
            payload.type,
            server_round=server_round,
            client_id=client_id,
            data=payload.to_data(),
            durable=durable,
        )

    def _published(self, events: Sequence[Event]) -> None:
        self.last_seq = max(self.last_seq, events[-1].seq)
        for event in events:
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:  # a broken panel must not break the coordinator
                    log.exception("event listener failed")
        self._wake()

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
