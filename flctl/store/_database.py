"""Database: the store's engine, sessions and transactions (the plumbing every part shares)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import (
    Connection,
    event,
)
from sqlalchemy import exc as sa_exc
from sqlmodel import Session

from flctl.core.errors import (
    ConflictError,
    StoreError,
)
from flctl.core.events import Event
from flctl.store._backends import backend_for, redact
from flctl.store._schema import STORE_ID_KEY, check_schema, init_schema
from flctl.store._state import (
    corrupt_error,
    is_corruption,
)
from flctl.store._tables import (
    MetaRow,
)

__all__ = ["Database"]


class Database:
    """The engine, sessions and transactions that every part of the store works through.

    :meth:`session` and :meth:`commit` are for the store's own modules (models, rounds,
    clients, events, the privacy ledger, revocations); callers outside the package use
    :class:`flctl.store.SqlStore`'s typed methods and :meth:`transaction`.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.is_read_only = read_only
        #: Where :meth:`open` backed the database up before migrating it (None: no migration).
        self.backup_path: Path | None = None
        #: The schema version the database had before :meth:`open` migrated it.
        self.migrated_from: int | None = None
        #: The database file, when opened with :meth:`open`.
        self.path: Path | None = None
        #: Where ``open(new_state=True)`` moved the database it replaced (None: there was none).
        self.replaced_path: Path | None = None
        # The coordinator may call from worker threads; one lock keeps each read-modify-write
        # (next version, counters) atomic within the process, and protects the single shared
        # connection of an in-memory database.
        self._lock = threading.RLock()
        # Read by the backend's "begin" listener while self._lock is held (SQLite: BEGIN
        # IMMEDIATE and synchronous for writes; PostgreSQL: synchronous_commit, the fence).
        self._is_write = False
        self._durable = True
        # The session of the open :meth:`transaction`, and the events written in the current
        # transaction, handed to :attr:`on_events` once it commits.
        self._batch: Session | None = None
        self._unpublished: list[Event] = []
        #: Called (on the committing thread) with the events of each committed transaction.
        self.on_events: Callable[[Sequence[Event]], None] | None = None
        self._on_close: list[Callable[[], None]] = []
        #: The leadership epoch this process writes in (0: no leadership); events record it.
        self.epoch = 0
        #: What differs between SQLite and PostgreSQL (engine, transactions, errors).
        self.backend = backend_for(url)
        #: The database's SQLAlchemy dialect: "sqlite" or "postgresql".
        self.dialect = self.backend.name
        try:
            self._engine = self.backend.make_engine(read_only=read_only)
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot open database {redact(url)!r}: {exc}") from exc
        event.listen(self._engine, "begin", self._begin)
        self.schema_found: int | None = None
        try:
            if read_only:
                with self.session() as session:
                    check_schema(session)
            else:
                with self.session(write=True) as session:
                    #: The schema version the database had when opened (None: it had none).
                    self.schema_found = init_schema(session)
                    self.commit(session)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def store_id(self) -> str:
        """The random id this store got when it was created (mirrored in ``store.json``)."""
        with self.session() as session:
            row = session.get(MetaRow, STORE_ID_KEY)
            return "" if row is None else row.value

    def close(self) -> None:
        """Release every database connection (and what was tied to the store's lifetime)."""
        while self._on_close:
            self._on_close.pop()()
        self._engine.dispose()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the store closes (before its connections go)."""
        self._on_close.append(callback)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self._engine.url)!r})"

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def session(self, *, write: bool = False, durable: bool = True) -> Iterator[Session]:
        """One short transaction; SQLAlchemy errors become flctl store errors, once, here.

        Inside :meth:`transaction` every call shares the one open session (same thread: the
        lock is reentrant and held for the whole transaction).

        ``durable=False``: the commit does not wait for the disk (SQLite: ``synchronous =
        NORMAL``; PostgreSQL: ``synchronous_commit = off``). It still survives the process
        being killed; only a power loss may take it, and the next durable commit makes it
        durable too (one log, written in order).
        Used for what is only informational: client state events, transfer counters.
        """
        with self._lock:
            if self._batch is not None:
                yield self._batch
                return
            self._is_write = write
            self._durable = durable
            try:
                with Session(self._engine, expire_on_commit=False) as session:
                    yield session
            except sa_exc.IntegrityError as exc:
                # A unique or foreign key constraint fired: another writer got there first.
                raise ConflictError(f"the state changed under us: {exc.orig}") from exc
            except sa_exc.DBAPIError as exc:
                lost = self.backend.unavailable(exc)
                if lost is not None:
                    raise lost from exc
                if exc.orig is not None and is_corruption(exc.orig):
                    raise corrupt_error(self._where(), exc.orig) from exc
                # The driver's own message, without the SQL statement and its parameters.
                raise StoreError(f"database error: {exc.orig}") from exc
            except UnicodeDecodeError as exc:  # pysqlite decoding a damaged schema or row
                raise corrupt_error(self._where(), exc) from exc
            except sa_exc.SQLAlchemyError as exc:
                raise StoreError(f"database error: {exc}") from exc
            finally:
                self._is_write = False
                self._durable = True
                self._unpublished.clear()  # committed ones were published; the rest never were

    def _where(self) -> Path:
        return self.path or Path(self._engine.url.database or ":memory:")

    def commit(self, session: Session) -> None:
        """Commit, then hand the events written to :attr:`on_events`.

        Inside :meth:`transaction` it only flushes: the outer transaction commits.
        """
        if session is self._batch:
            session.flush()
            return
        session.commit()
        self._publish()

    def _publish(self) -> None:
        events, self._unpublished = self._unpublished, []
        if events and self.on_events is not None:
            self.on_events(events)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group store calls into one transaction: all of their writes land, or none does.

        The coordinator writes a change and the events that describe it together, so that a
        crash can never leave one without the other. Nested uses join the outer transaction.
        Hold it briefly and never across an ``await``: other threads wait for it.

        Example:
            >>> store = SqlStore("sqlite://")
            >>> with store.transaction():
            ...     v = store.add_model(digest="ab" * 32, kind="initial", set_head=True).version
            ...     e = store.append_event("model.created", data={"version": v})
            >>> store.last_event_seq()
            1
            >>> store.close()
        """
        with self._lock:
            if self._batch is not None:
                yield
                return
            with self.session(write=True) as session:
                self._batch = session
                try:
                    yield
                    session.commit()
                finally:
                    self._batch = None
                self._publish()  # before session()'s exit, which drops unpublished events

    def _begin(self, connection: Connection) -> None:
        self.backend.begin(connection, write=self._is_write, durable=self._durable)
