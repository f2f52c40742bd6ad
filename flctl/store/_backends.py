"""What differs between the two databases the store runs on: SQLite and PostgreSQL.

:class:`Database` asks its backend for the engine, lets it open each transaction (SQLite's
``BEGIN IMMEDIATE`` and per-commit durability, PostgreSQL's ``synchronous_commit`` and the
leadership fence), and lets it name the errors its driver raises. Nothing outside this module
knows a pragma or a PostgreSQL setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from flctl.core.errors import ConfigError, FlctlError, StoreUnavailableError

__all__ = ["Backend", "PostgresBackend", "SqliteBackend", "backend_for", "redact"]

#: Called at the start of each write transaction on PostgreSQL (the leadership fence).
WriteCheck = Callable[[Connection], None]


def redact(url: str | URL) -> str:
    """The URL as it may be shown: the password replaced by ``***``."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except sa_exc.ArgumentError:
        return "<unparseable database URL>"
    return parsed.render_as_string(hide_password=True)


class Backend:
    """The SQLite and PostgreSQL differences; :func:`backend_for` picks one from a URL."""

    name = ""

    def __init__(self, url: URL) -> None:
        self.url = url

    def make_engine(self, *, read_only: bool, keepalive: bool = False) -> Engine:
        """The engine, with this backend's connection settings.

        ``keepalive`` (PostgreSQL): TCP keepalives every few seconds both ways, so that the
        server ends the session of a vanished peer quickly (the leadership lock's connection).
        """
        raise NotImplementedError

    def begin(self, connection: Connection, *, write: bool, durable: bool) -> None:
        """Open a transaction on ``connection`` (SQLAlchemy's "begin" event)."""

    def unavailable(self, exc: sa_exc.DBAPIError) -> FlctlError | None:
        """A :class:`StoreUnavailableError` when ``exc`` says the server cannot be reached."""
        return None


class SqliteBackend(Backend):
    """One file (or memory) on this machine.

    WAL, ``BEGIN IMMEDIATE`` for writes, and ``synchronous=FULL`` except for informational
    writes (``durable=False``: ``NORMAL``).
    """

    name = "sqlite"

    def make_engine(self, *, read_only: bool, keepalive: bool = False) -> Engine:
        kwargs: dict[str, Any] = {}
        database = self.url.database or ""
        if database in ("", ":memory:") or self.url.query.get("mode") == "memory":
            # One connection shared by all threads, or each thread would see its own database.
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
        engine = create_engine(self.url, **kwargs)
        event.listen(engine, "connect", _sqlite_connect_read_only if read_only else _sqlite_connect)
        return engine

    def begin(self, connection: Connection, *, write: bool, durable: bool) -> None:
        if write:
            synchronous = "FULL" if durable else "NORMAL"
            if connection.info.get("synchronous") != synchronous:  # per connection
                connection.exec_driver_sql(f"PRAGMA synchronous={synchronous}")
                connection.info["synchronous"] = synchronous
        # Write transactions take the write lock up front, so another process's commit between
        # our read and our write makes us wait (busy_timeout) instead of failing.
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class PostgresBackend(Backend):
    """A server shared by coordinators.

    psycopg 3, a connection pool that tests connections before use, ``synchronous_commit=off``
    for informational writes, and the leadership fence (:attr:`write_check`) at the start of
    every write transaction.
    """

    name = "postgresql"
    #: Seconds to wait for the server to answer a new connection.
    CONNECT_TIMEOUT_S = 5

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        #: Set by the leadership: raises FencedError when another coordinator took over.
        self.write_check: WriteCheck | None = None

    def make_engine(self, *, read_only: bool, keepalive: bool = False) -> Engine:
        options: dict[str, Any] = {
            "connect_timeout": self.CONNECT_TIMEOUT_S,
            # names the process, so that an operator (or a test) can tell coordinators apart
            "application_name": f"flctl/{os.getpid()}",
        }
        settings = []
        if read_only:
            settings.append("-c default_transaction_read_only=on")
        if keepalive:
            options.update(keepalives=1, keepalives_idle=2, keepalives_interval=1)
            options["keepalives_count"] = 3
            settings.append(
                "-c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
            )
        if settings:
            options["options"] = " ".join(settings)
        return create_engine(
            self.url, pool_pre_ping=True, pool_size=4, max_overflow=8, connect_args=options
        )

    def begin(self, connection: Connection, *, write: bool, durable: bool) -> None:
        if write and not durable:
            connection.exec_driver_sql("SET LOCAL synchronous_commit TO off")
        if write and self.write_check is not None:
            self.write_check(connection)

    def unavailable(self, exc: sa_exc.DBAPIError) -> FlctlError | None:
        if isinstance(exc, sa_exc.OperationalError) or exc.connection_invalidated:
            return StoreUnavailableError(
                f"the state database {redact(self.url)} cannot be reached: {_first_line(exc.orig)}",
                hint="check that the PostgreSQL server runs and is reachable from here",
                details={"url": redact(self.url)},
            )
        return None


def backend_for(url: str) -> Backend:
    """The backend for a SQLAlchemy URL: ``sqlite:...`` or ``postgresql+psycopg://...``."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigError(
            f"invalid state database URL {redact(url)!r}",
            hint="e.g. postgresql+psycopg://user@host:5432/flctl, or sqlite:///path/state.db",
        ) from exc
    name = parsed.get_backend_name()
    if name == "sqlite":
        return SqliteBackend(parsed)
    if name == "postgresql":
        if parsed.get_driver_name() not in ("psycopg", "psycopg2", "postgresql", ""):
            raise ConfigError(
                f"state database URL {redact(parsed)!r}: flctl talks to PostgreSQL through "
                "psycopg 3 only",
                hint="write the URL as postgresql+psycopg://...",
            )
        return PostgresBackend(parsed.set(drivername="postgresql+psycopg"))
    raise ConfigError(
        f"state database URL {redact(parsed)!r}: flctl stores its state in SQLite or "
        "PostgreSQL only",
        hint="e.g. postgresql+psycopg://user@host:5432/flctl",
    )


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__


def _sqlite_connect_read_only(dbapi_connection: Any, _record: Any) -> None:
    """Settings for a ``mode=ro`` connection: no journal mode change (that would write)."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA query_only=ON")
    finally:
        cursor.close()


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """Apply flctl's SQLite settings to a new connection."""
    # pysqlite opens transactions lazily (only before DML) and commits DDL one statement at a
    # time; turning that off and emitting BEGIN ourselves (SQLAlchemy's documented recipe) makes
    # each Session one real transaction, reads and schema creation included.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()
