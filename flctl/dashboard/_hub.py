"""One follower of the coordinator's event log, fanned out to every browser watching."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from flctl.core.errors import FlctlError
from flctl.dashboard._source import AdminSource
from flctl.dashboard._views import event_view

__all__ = ["EventHub"]

log = logging.getLogger("flctl.dashboard")

#: Messages a browser may fall behind by before it is cut off (its page reconnects and reloads).
QUEUE_SIZE = 256

#: Events that arrive within this long go to the browsers as one message: a busy round writes
#: dozens a second, and each message is a write to every browser's connection.
BATCH_S = 0.1


def _debug() -> bool:
    """Tracebacks in the log only at DEBUG level (``--debug``)."""
    return log.isEnabledFor(logging.DEBUG)


def _sse(message: dict[str, Any]) -> str:
    """One server-sent event, serialized once for every browser."""
    return f"data: {json.dumps(message, separators=(',', ':'))}\n\n"


class EventHub:
    """Follows the event log through ``Watch`` (one stream for all browsers) and fans it out.

    Each subscriber gets a queue of server-sent events, serialized once for all of them:
    ``{"kind": "events", "events": [...]}`` with the events of the last :data:`BATCH_S`,
    ``{"kind": "link", "connected": ..., "leader": ..., "error": ..., "seq": ...}`` when the
    connection to the coordinator comes or goes, and ``None`` when it fell too far behind (its
    stream ends; the browser reconnects).

    Args:
        source: The Admin connection; its ``seq`` follows the newest event.
    """

    def __init__(self, source: AdminSource) -> None:
        self._source = source
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self.connected = False
        self.error = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._batch: list[dict[str, Any]] = []
        self._pending = asyncio.Event()

    @property
    def link(self) -> dict[str, Any]:
        """The connection's state, as the ``link`` message says it."""
        return {
            "kind": "link",
            "connected": self.connected,
            "leader": self._source.leader if self.connected else "",
            "error": self.error,
            "seq": self._source.seq,
        }

    def subscribe(self) -> asyncio.Queue[str | None]:
        """A new browser's queue (its first message says the connection's state)."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_SIZE)
        queue.put_nowait(_sse(self.link))
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None:
        """Forget a browser that left."""
        self._subscribers.discard(queue)

    @property
    def watchers(self) -> int:
        """How many browsers follow the stream now."""
        return len(self._subscribers)

    def _publish(self, message: dict[str, Any]) -> None:
        text = _sse(message)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)  # cut off: its stream ends

    def start(self) -> None:
        """Follow the log in the background until :meth:`stop`."""
        self._tasks = [
            asyncio.create_task(self._run(), name="dashboard-events"),
            asyncio.create_task(self._flush(), name="dashboard-batches"),
        ]

    async def stop(self) -> None:
        """Stop following."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set_link(self, connected: bool, error: str) -> None:
        if (connected, error) != (self.connected, self.error):
            self.connected, self.error = connected, error
            self._publish(self.link)

    async def _flush(self) -> None:
        while True:
            await self._pending.wait()
            await asyncio.sleep(BATCH_S)
            self._pending.clear()
            batch, self._batch = self._batch, []
            if batch:
                self._publish({"kind": "events", "events": batch})

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                client = await self._source.client()
                if self._source.seq == 0:  # start at the log's end, not at its beginning
                    page = await client.list_events(limit=1)
                    self._source.seq = int(page.last_seq)
                self._set_link(True, "")
                delay = 0.5
                async for event in client.watch(since_seq=self._source.seq):
                    self._source.seq = int(event.seq)
                    self._batch.append(event_view(event))
                    self._pending.set()
                raise FlctlError("the coordinator ended the event stream")
            except asyncio.CancelledError:
                raise
            except FlctlError as exc:
                if exc.message != self.error:  # once per new reason, not at every retry
                    log.warning("dashboard: event stream: %s", exc.message)
                self._set_link(False, exc.message)
                await self._source.reset()
            except Exception as exc:  # the loop must outlive any one failure
                self._set_link(False, f"unexpected error: {exc}")
                log.error("dashboard: event stream failed: %s", exc, exc_info=_debug())
                await self._source.reset()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
