"""One follower of the coordinator's event log, fanned out to every browser watching."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from flctl.core.errors import FlctlError
from flctl.dashboard._source import AdminSource
from flctl.dashboard._views import event_view

__all__ = ["EventHub"]

log = logging.getLogger("flctl.dashboard")


def _DEBUG() -> bool:  # noqa: N802
    """Tracebacks in the log only at DEBUG level (``--debug``)."""
    return log.isEnabledFor(logging.DEBUG)


#: Messages a browser may fall behind by before it is cut off (its page reconnects and reloads).
QUEUE_SIZE = 256


class EventHub:
    """Follows the event log through ``Watch`` (one stream for all browsers) and fans it out.

    Each subscriber gets a queue of JSON-ready messages: ``{"kind": "event", "event": ...}``
    for each event, ``{"kind": "link", "connected": ..., "leader": ..., "error": ...}`` when
    the connection to the coordinator comes or goes, and ``None`` when it fell too far behind
    (its stream ends; the browser reconnects).

    Args:
        source: The Admin connection; its ``seq`` follows the newest event.
    """

    def __init__(self, source: AdminSource) -> None:
        self._source = source
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.connected = False
        self.error = ""
        self._task: asyncio.Task[None] | None = None

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

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        """A new browser's queue (its first message says the connection's state)."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)
        queue.put_nowait(self.link)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Forget a browser that left."""
        self._subscribers.discard(queue)

    @property
    def watchers(self) -> int:
        """How many browsers follow the stream now."""
        return len(self._subscribers)

    def _publish(self, message: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)  # cut off: its stream ends

    def start(self) -> None:
        """Follow the log in the background until :meth:`stop`."""
        self._task = asyncio.create_task(self._run(), name="dashboard-events")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _set_link(self, connected: bool, error: str) -> None:
        if (connected, error) != (self.connected, self.error):
            self.connected, self.error = connected, error
            self._publish(self.link)

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
                    self._publish({"kind": "event", "event": event_view(event)})
                raise FlctlError("the coordinator ended the event stream")
            except asyncio.CancelledError:
                raise
            except FlctlError as exc:
                self._set_link(False, exc.message)
                log.warning("dashboard: event stream: %s", exc.message)
                await self._source.reset()
            except Exception as exc:  # the loop must outlive any one failure
                self._set_link(False, f"unexpected error: {exc}")
                log.error("dashboard: event stream failed: %s", exc, exc_info=_DEBUG())
                await self._source.reset()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
