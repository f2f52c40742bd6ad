"""The dashboard's one connection to the coordinator's Admin service, and its read cache.

Every page and every browser reads through one :class:`AdminSource`: a read answered from the
coordinator is kept until the next event arrives (the event stream is what changes it), and
reads asked for at the same time share one call, so twenty browsers watching a round cost the
coordinator about what one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from flctl.core.errors import ConnectError, FlctlError, StandbyError
from flctl.transport.grpc import AdminClient

__all__ = ["AdminSource", "Connect"]

T = TypeVar("T")

#: Opens an Admin connection to the leading coordinator: the client and the address it reached.
Connect = Callable[[], Awaitable[tuple[AdminClient, str]]]

log = logging.getLogger("flctl.dashboard")

#: The event seqs the reads of the current request were answered at (see ``AdminSource.read``).
READ_SEQS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "flctl_dashboard_read_seqs", default=None
)

#: A cached read is refreshed after this long even without events (clients' live state and
#: transfer rates change without one).
MAX_AGE_S = 2.0

#: A read is not repeated sooner than this, however many events arrived since: a busy round
#: writes dozens of events a second, and the pages need not re-read the coordinator for each.
#: Pages know the answer is behind (its ``seq`` is older than the stream's) and ask again.
MIN_AGE_S = 0.5


class AdminSource:
    """Admin calls with reconnection to the leader, and a read cache keyed by the event seq.

    Args:
        connect: Opens a connection to the leader (finds it among several addresses).
    """

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._client: AdminClient | None = None
        self._lock = asyncio.Lock()
        self.leader = ""
        #: The newest event seq seen (:class:`~flctl.dashboard.EventHub` moves it).
        self.seq = 0
        self._cache: dict[str, tuple[int, float, Any]] = {}
        self._pending: dict[str, asyncio.Future[Any]] = {}

    async def client(self) -> AdminClient:
        """The open connection, opened (to the leader) on first use or after a failure."""
        async with self._lock:
            if self._client is None:
                self._client, self.leader = await self._connect()
            return self._client

    async def reset(self) -> None:
        """Drop the connection: the next call finds the leader again."""
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def call(self, fn: Callable[[AdminClient], Awaitable[T]]) -> T:
        """Run ``fn`` on the connection; once more on a fresh one if the leader went away."""
        for attempt in (1, 2):
            client = await self.client()
            try:
                return await fn(client)
            except (ConnectError, StandbyError):
                await self.reset()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def read(self, key: str, fn: Callable[[AdminClient], Awaitable[T]]) -> T:
        """``fn``'s answer, shared by concurrent readers and kept until the next event.

        At most one call per :data:`MIN_AGE_S` for each ``key``; :meth:`seq_of` says how
        recent the answer is.
        """
        now = time.monotonic()
        hit = self._cache.get(key)
        seqs = READ_SEQS.get()
        if hit is not None and (
            now - hit[1] < MIN_AGE_S or (hit[0] == self.seq and now - hit[1] < MAX_AGE_S)
        ):
            if seqs is not None:
                seqs.append(hit[0])
            return hit[2]  # type: ignore[no-any-return]
        pending = self._pending.get(key)
        if pending is not None:
            if seqs is not None:
                seqs.append(self.seq)
            return await asyncio.shield(pending)
        seq = self.seq
        if seqs is not None:
            seqs.append(seq)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await self.call(fn)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else FlctlError("stopped"))
                future.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            future.set_result(value)
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = (seq, now, value)
            return value
        finally:
            self._pending.pop(key, None)

    def seq_of(self, key: str) -> int:
        """The event seq the cached answer for ``key`` was read at (0: none cached)."""
        hit = self._cache.get(key)
        return hit[0] if hit is not None else 0

    async def close(self) -> None:
        """Close the connection."""
        await self.reset()
