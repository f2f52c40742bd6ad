"""Standing by, and leading: ``flctl serve`` on a state store shared through PostgreSQL.

A coordinator whose store is on PostgreSQL takes leadership before it serves
(:class:`flctl.store.Leadership`: advisory lock, epoch, fenced writes). While another leads
it stands by: its address answers every call with "standby; leader is ADDRESS" and the health
service says NOT_SERVING. It polls for the lock; when the leader's database session ends (the
process killed, its machine gone), it takes over and the coordinator starts as a restarted
one does, resuming the open round. While leading it checks, every second, that its lock
session lives and the epoch is its own; when not, it stops serving rather than diverge.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from flctl.core.errors import FencedError, FlctlError, StoreUnavailableError
from flctl.store import Leadership, SqlStore
from flctl.transport.grpc import Health, ServerCredentials, split_address, start_standby_server

__all__ = ["Election", "advertised"]

log = logging.getLogger("flctl.coordinator")

#: Seconds between a standby's tries for the lock, and between a leader's checks.
POLL_S = 0.5
CHECK_S = 1.0


def advertised(bound: str) -> str:
    """The address to name to clients: the bound one, with this host's name for 0.0.0.0."""
    host, port = split_address(bound)
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


class Election:
    """One coordinator's part in the leadership of a shared store."""

    def __init__(self, store: SqlStore, address: str) -> None:
        self.leadership = Leadership(store, address)
        self.health = Health()
        #: Set when leadership is lost while serving (the reason).
        self.lost: FlctlError | None = None
        self.lost_event = asyncio.Event()
        self._leader_cache: str | None = None

    async def lead(
        self,
        *,
        address: str,
        credentials: ServerCredentials | None,
        max_chunk_bytes: int,
        advertise: str = "",
    ) -> str:
        """Return once this coordinator leads; stand by on ``address`` until then.

        Returns:
            The address to serve on (the standby's bound port, where ``address`` asked for 0).
        """
        leadership = self.leadership
        if await asyncio.to_thread(leadership.try_acquire):
            return address
        server, port = await start_standby_server(
            address,
            credentials=credentials,
            leader=self._leader_address,
            health=self.health,
            max_chunk_bytes=max_chunk_bytes,
        )
        host, _ = split_address(address)
        address = f"{host}:{port}"
        await asyncio.to_thread(leadership.set_address, advertise or advertised(address))
        try:
            await asyncio.to_thread(self._refresh_leader)
            log.warning("standing by on %s; the leader is %s", address, self._leader_cache)
            while not await asyncio.to_thread(self._poll):
                await asyncio.sleep(POLL_S)
        finally:
            await server.stop(grace=0.2)
        log.warning("took over the store as epoch %d", leadership.epoch)
        return address

    def _poll(self) -> bool:
        try:
            if self.leadership.try_acquire():
                return True
            self._refresh_leader()
        except StoreUnavailableError as exc:  # the database is away: keep standing by
            log.warning("%s", exc.message)
        return False

    def _refresh_leader(self) -> None:
        leader = self.leadership.leader()
        self._leader_cache = None if leader is None else leader.address

    def _leader_address(self) -> str | None:
        return self._leader_cache

    async def watch(self, address: str) -> None:
        """While leading at ``address``: check the lock session and the epoch every second.

        On a loss, :attr:`lost` says why and :attr:`lost_event` is set (``serve`` stops).
        """
        try:
            await asyncio.to_thread(self.leadership.set_address, address)
        except StoreUnavailableError as exc:
            log.warning("%s", exc.message)
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                await asyncio.to_thread(self.leadership.check)
            except (StoreUnavailableError, FencedError) as exc:
                self.lost = exc
                log.error("lost the leadership of the store: %s; stepping down", exc.message)
                self.lost_event.set()
                return

    def release(self, reason: str) -> None:
        """Step down (the next standby takes over at once)."""
        self.leadership.release(reason)
