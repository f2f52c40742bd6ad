"""The dashboard's one connection to the coordinator's Admin service.

Every page and every browser reads through one :class:`AdminSource`: reads asked for at the
same time share one call. With the app's cache of answers by URL (kept until the next event
arrives, :func:`~flctl.dashboard.create_app`), twenty browsers watching a round cost the
coordinator about what one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
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


class AdminSource:
    """Admin calls with reconnection to the leader; concurrent reads share one call.

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
        #: reads in flight by key: the event seq each started at, and its answer to come
        self._pending: dict[str, tuple[int, asyncio.Future[Any]]] = {}

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
        """``fn``'s answer; readers of the same ``key`` while a call is in flight share it.

        The event seq the answer was read at goes to :data:`READ_SEQS` (the request's list,
        when set): a page knows how recent it is.
        """
        seqs = READ_SEQS.get()
        pending = self._pending.get(key)
        if pending is not None:
            if seqs is not None:
                seqs.append(pending[0])
            return await asyncio.shield(pending[1])
        seq = self.seq
        if seqs is not None:
            seqs.append(seq)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = (seq, future)
        try:
            value = await self.call(fn)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else FlctlError("stopped"))
                future.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            future.set_result(value)
            return value
        finally:
            self._pending.pop(key, None)

    async def close(self) -> None:
        """Close the connection."""
        await self.reset()
