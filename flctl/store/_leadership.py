"""Leadership among coordinators that share one PostgreSQL database.

Exactly one coordinator leads: it holds a PostgreSQL session-level advisory lock on a
connection of its own, and the epoch it bumped when it took over. The server releases the lock
when that session ends (the process killed, its machine gone, the connection cut), and a
standby polling for the lock takes over with the next epoch.

Fencing: every write transaction of the leader's store first reads the leadership row
``FOR SHARE`` and goes on only while the epoch there is its own (:class:`FencedError`
otherwise). A takeover updates that row, so it waits for the old leader's open write
transactions to end, and any write the old leader begins afterwards is refused: a leader
paused (stopped, swapped out, cut off) while a standby took over can never write again.
Each takeover also adds a row to ``leaders``, so every epoch has exactly one leader, and each
event records the epoch it was written in.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc

from flctl.core.errors import ConfigError, ConflictError, FencedError, StoreUnavailableError
from flctl.store._backends import PostgresBackend, redact
from flctl.store._database import Database

__all__ = [
    "CoordinatorInfo",
    "LeaderInfo",
    "Leadership",
    "hold_offline",
    "list_coordinators",
    "list_leaders",
]

log = logging.getLogger("flctl.store.leadership")

#: The advisory lock's key: "flctl" in ASCII, so it does not collide with another program's.
LOCK_KEY = 0x666C63746C


@dataclass(frozen=True)
class CoordinatorInfo:
    """A coordinator as it last reported itself in the ``coordinators`` table."""

    address: str
    role: str
    epoch: int
    host: str
    pid: int
    started: float
    seen: float


@dataclass(frozen=True)
class LeaderInfo:
    """Who led in one epoch."""

    epoch: int
    address: str
    host: str
    pid: int
    since: float
    ended: float | None
    end_reason: str


class Leadership:
    """Take, hold and check leadership of a store on PostgreSQL.

    Args:
        store: The coordinator's store (on PostgreSQL); its writes get the fence.
        address: The address this coordinator serves on (shown to clients and ``status``).

    Raises:
        ConfigError: The store is not on PostgreSQL.
    """

    def __init__(self, store: Database, address: str) -> None:
        if not isinstance(store.backend, PostgresBackend):
            raise ConfigError(
                "standby coordinators need a state store on PostgreSQL ([store] url)",
            )
        self.store = store
        self.backend: PostgresBackend = store.backend
        self.address = address
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        #: The epoch this coordinator leads in (0: not leading).
        self.epoch = 0
        self._lock = threading.Lock()
        # A connection of our own, outside the store's pool: the advisory lock lives as long
        # as its session. TCP keepalives make the server notice a vanished peer in seconds.
        self._engine: Engine = self.backend.make_engine(read_only=False, keepalive=True)
        self._connection: Connection | None = None

    @property
    def is_leader(self) -> bool:
        return self.epoch > 0

    def _connect(self) -> Connection:
        if self._connection is None:
            connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._connection = connection
        return self._connection

    def _run(self, sql: str, **params: object) -> list[tuple[object, ...]]:
        """One statement on our own connection; a lost connection is StoreUnavailableError."""
        try:
            result = self._connect().execute(text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
        except sa_exc.DBAPIError as exc:
            self._drop_connection()
            raise StoreUnavailableError(
                f"lost the connection to the state database {redact(self.backend.url)}: "
                f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}",
                hint="check that the PostgreSQL server runs and is reachable from here",
            ) from exc

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()
                connection.close()
            except sa_exc.SQLAlchemyError:  # pragma: no cover - already gone
                pass

    def try_acquire(self) -> bool:
        """Take leadership if no one holds it: lock, next epoch, fence. True when taken."""
        with self._lock:
            if self.is_leader:
                return True
            (taken,) = self._run("SELECT pg_try_advisory_lock(:key)", key=LOCK_KEY)[0]
            if not taken:
                self.report("standby")
                return False
            now = time.time()
            rows = self._run(
                "INSERT INTO leadership (id, epoch) VALUES (1, 1) "
                "ON CONFLICT (id) DO UPDATE SET epoch = leadership.epoch + 1 RETURNING epoch"
            )
            epoch = int(str(rows[0][0]))
            self._run(
                "UPDATE leaders SET ended = :now, end_reason = 'taken over' "
                "WHERE ended IS NULL AND epoch < :epoch",
                now=now,
                epoch=epoch,
            )
            self._run(
                "INSERT INTO leaders (epoch, address, host, pid, since, end_reason) "
                "VALUES (:epoch, :address, :host, :pid, :now, '')",
                epoch=epoch,
                address=self.address,
                host=self.host,
                pid=self.pid,
                now=now,
            )
            self.epoch = epoch
            self.store.epoch = epoch
            self.backend.write_check = self._fence
            self.report("leader")
            log.info("leading the store as epoch %d", epoch)
            return True

    def _fence(self, connection: Connection) -> None:
        """The store's write check: go on only while the leadership row holds our epoch."""
        row = connection.exec_driver_sql(
            "SELECT epoch FROM leadership WHERE id = 1 FOR SHARE"
        ).first()
        current = 0 if row is None else int(row[0])
        if current != self.epoch:
            raise FencedError(
                f"coordinator {self.address} led in epoch {self.epoch}, but another took over "
                f"(epoch {current}): its writes are refused",
                hint="this coordinator stops; the leader serves the clients",
                details={"epoch": self.epoch, "current": current},
            )

    def check(self) -> None:
        """Raise unless we still lead: our session (and so the lock) alive, the epoch ours.

        Raises:
            StoreUnavailableError: The connection that holds the lock is lost.
            FencedError: Another coordinator took over.
        """
        with self._lock:
            rows = self._run("SELECT epoch FROM leadership WHERE id = 1")
            current = int(str(rows[0][0])) if rows else 0
            if self.is_leader and current != self.epoch:
                raise FencedError(
                    f"another coordinator took over the store (epoch {current}; ours was "
                    f"{self.epoch})",
                    details={"epoch": self.epoch, "current": current},
                )
            self.report("leader" if self.is_leader else "standby")

    def report(self, role: str) -> None:
        """Record this coordinator's role in ``coordinators`` (``flctl status`` reads it)."""
        self._run(
            "INSERT INTO coordinators (address, role, epoch, host, pid, started, seen) "
            "VALUES (:address, :role, :epoch, :host, :pid, :started, :seen) "
            "ON CONFLICT (address) DO UPDATE SET role = :role, epoch = :epoch, host = :host, "
            "pid = :pid, started = :started, seen = :seen",
            address=self.address,
            role=role,
            epoch=self.epoch,
            host=self.host,
            pid=self.pid,
            started=self.started,
            seen=time.time(),
        )

    def set_address(self, address: str) -> None:
        """Name the address this coordinator serves on, once bound (port 0 picks one)."""
        with self._lock:
            old, self.address = self.address, address
            if old == address:
                return
            self._run(
                "DELETE FROM coordinators WHERE address = :old AND pid = :pid",
                old=old,
                pid=self.pid,
            )
            if self.is_leader:
                self._run(
                    "UPDATE leaders SET address = :address WHERE epoch = :epoch",
                    address=address,
                    epoch=self.epoch,
                )
            self.report("leader" if self.is_leader else "standby")

    def leader(self) -> LeaderInfo | None:
        """The current leader (the newest epoch not ended), if any."""
        leaders = [x for x in list_leaders(self.store) if x.ended is None]
        return leaders[-1] if leaders else None

    def release(self, reason: str = "stopped") -> None:
        """Step down: end our epoch's row, drop the lock (closing our session drops it too)."""
        with self._lock:
            try:
                if self.is_leader:
                    self._run(
                        "UPDATE leaders SET ended = :now, end_reason = :reason "
                        "WHERE epoch = :epoch AND ended IS NULL",
                        now=time.time(),
                        reason=reason,
                        epoch=self.epoch,
                    )
                self._run(
                    "UPDATE coordinators SET role = 'stopped', seen = :now "
                    "WHERE address = :address AND pid = :pid",
                    now=time.time(),
                    address=self.address,
                    pid=self.pid,
                )
            except StoreUnavailableError:
                pass  # the session is gone, and the lock with it
            finally:
                self.backend.write_check = self._refuse_all if self.is_leader else None
                self._drop_connection()
                self._engine.dispose()

    def _refuse_all(self, connection: Connection) -> None:
        raise FencedError(
            f"coordinator {self.address} stepped down (epoch {self.epoch}): its writes are refused"
        )


def hold_offline(store: Database, command: str) -> None:
    """Let an offline command write a shared store only while no coordinator leads it.

    The command takes the leadership's advisory lock on a connection of its own, kept until
    the store closes: a coordinator starting meanwhile stands by until then.

    Raises:
        ConflictError: A coordinator leads the store (the change must go through it).
    """
    if not isinstance(store.backend, PostgresBackend):
        return
    engine = store.backend.make_engine(read_only=False, keepalive=True)
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}
        ).scalar()
    except sa_exc.DBAPIError as exc:
        connection.close()
        engine.dispose()
        raise StoreUnavailableError(
            f"cannot reach {redact(store.backend.url)}: {exc.orig}"
        ) from exc
    if not taken:
        connection.close()
        engine.dispose()
        leaders = [x for x in list_leaders(store) if x.ended is None]
        where = f" ({leaders[-1].address}, epoch {leaders[-1].epoch})" if leaders else ""
        raise ConflictError(
            f"a coordinator leads this store{where}: `{command}` does not write it beside it",
            hint="go through the leader (--server with the coordinators' addresses, where the "
            "command offers it), or stop the coordinators first",
        )

    def release() -> None:
        connection.close()  # ends the session, and the lock with it
        engine.dispose()

    store.on_close(release)


def list_coordinators(store: Database) -> list[CoordinatorInfo]:
    """Every coordinator that reported itself on this database, by address."""
    with store.session() as session:
        rows = session.connection().exec_driver_sql(
            "SELECT address, role, epoch, host, pid, started, seen FROM coordinators "
            "ORDER BY address"
        )
        return [
            CoordinatorInfo(str(a), str(r), int(e), str(h), int(p), float(st), float(se))
            for a, r, e, h, p, st, se in rows
        ]


def list_leaders(store: Database) -> list[LeaderInfo]:
    """Who led in each epoch, oldest first."""
    with store.session() as session:
        rows = session.connection().exec_driver_sql(
            "SELECT epoch, address, host, pid, since, ended, end_reason FROM leaders ORDER BY epoch"
        )
        return [
            LeaderInfo(
                int(e), str(a), str(h), int(p), float(s), None if n is None else float(n), str(r)
            )
            for e, a, h, p, s, n, r in rows
        ]
