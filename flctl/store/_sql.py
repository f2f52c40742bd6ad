"""SqlStore: the coordinator's state (models, refs, rounds, updates, clients, events) in SQL.

Every method is one short transaction on its own ``Session`` and returns frozen records from
``flctl.store._records`` (or :class:`flctl.core.events.Event`), never ORM rows. Only the ORM and
SQLAlchemy Core are used, so the URL may point at PostgreSQL as well as SQLite; the SQLite
pragmas are applied by a connect listener only when the dialect is SQLite.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, col, select

from flctl.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StoreError,
)
from flctl.core.events import Event
from flctl.store._records import (
    MODEL_KINDS,
    ROUND_STATUSES,
    TERMINAL,
    UPDATE_STATUSES,
    ClientRecord,
    ModelRecord,
    RoundRecord,
    UpdateRecord,
)
from flctl.store._tables import (
    ClientRow,
    EventRow,
    MetaRow,
    ModelRow,
    RefRow,
    RoundRow,
    TableBase,
    UpdateRow,
)

__all__ = ["SqlStore"]

_HEAD = "head"
_SCHEMA_KEY = "schema_version"
_IN_PROGRESS = tuple(s for s in ROUND_STATUSES if s != "queued" and s not in TERMINAL)


class SqlStore:
    """The coordinator's relational state, behind a small typed API.

    Args:
        url: A SQLAlchemy database URL, e.g. ``sqlite:///.flctl/state.db``, ``sqlite://``
            (in memory) or ``postgresql+psycopg://...``.

    Raises:
        SchemaMismatchError: The database was written with another schema version.
        StoreError: The database cannot be opened.

    Example:
        >>> store = SqlStore("sqlite://")
        >>> store.add_model(digest="ab" * 32, kind="initial", set_head=True).version
        1
        >>> store.close()
    """

    SCHEMA_VERSION: ClassVar[int] = 1

    def __init__(self, url: str) -> None:
        # The coordinator may call from worker threads; one lock keeps each read-modify-write
        # (next version, counters) atomic within the process, and protects the single shared
        # connection of an in-memory database.
        self._lock = threading.RLock()
        # Read by the SQLite "begin" listener while self._lock is held: write transactions take
        # the write lock up front (BEGIN IMMEDIATE), so another process's commit between our
        # read and our write makes us wait (busy_timeout) instead of failing.
        self._is_write = False
        try:
            self._engine = _make_engine(url)
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot open database {url!r}: {exc}") from exc
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_connect)
            event.listen(self._engine, "begin", self._sqlite_begin)
        try:
            self._init_schema()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def open(cls, state_dir: Path) -> SqlStore:
        """Open (creating if needed) ``<state_dir>/state.db``.

        Args:
            state_dir: The coordinator's state folder; created with its parents.

        Returns:
            The store.
        """
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state folder {str(state_dir)!r}: {exc}") from exc
        return cls(f"sqlite:///{state_dir.resolve() / 'state.db'}")

    def close(self) -> None:
        """Release every database connection."""
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqlStore({self._engine.url.render_as_string(hide_password=True)!r})"

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """One short transaction; SQLAlchemy errors become flctl store errors, once, here."""
        with self._lock:
            self._is_write = write
            try:
                with Session(self._engine, expire_on_commit=False) as session:
                    yield session
            except sa_exc.IntegrityError as exc:
                # A unique or foreign key constraint fired: another writer got there first.
                raise ConflictError(f"the state changed under us: {exc.orig}") from exc
            except sa_exc.DBAPIError as exc:
                # The driver's own message, without the SQL statement and its parameters.
                raise StoreError(f"database error: {exc.orig}") from exc
            except sa_exc.SQLAlchemyError as exc:
                raise StoreError(f"database error: {exc}") from exc
            finally:
                self._is_write = False

    def _sqlite_begin(self, connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if self._is_write else "BEGIN")

    def _init_schema(self) -> None:
        with self._session(write=True) as session:
            inspector = inspect(session.connection())
            existing = set(inspector.get_table_names())
            if "meta" in existing:
                row = session.get(MetaRow, _SCHEMA_KEY)
                found = row.value if row is not None else None
                if found != str(self.SCHEMA_VERSION):
                    raise SchemaMismatchError(
                        f"state database has schema version {found}, "
                        f"this flctl uses {self.SCHEMA_VERSION}",
                        hint="use the flctl version that wrote it, or a fresh state folder",
                        details={"found": found, "expected": self.SCHEMA_VERSION},
                    )
            elif existing & set(TableBase.metadata.tables):
                raise SchemaMismatchError(
                    "state database has flctl tables but no schema version",
                    details={"found": None, "expected": self.SCHEMA_VERSION},
                )
            TableBase.metadata.create_all(session.connection())
            if "meta" not in existing:
                session.add(MetaRow(key=_SCHEMA_KEY, value=str(self.SCHEMA_VERSION)))
            session.commit()

    # -- models and refs --------------------------------------------------------------------

    def add_model(
        self,
        *,
        digest: str,
        kind: str,
        parent: int | None = None,
        server_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
        set_head: bool = False,
    ) -> ModelRecord:
        """Record a new model version (the next number, from 1).

        Args:
            digest: SHA-256 of the model's blob.
            kind: ``initial``, ``aggregate``, ``rollback`` or ``import``.
            parent: The version it derives from, if any; must exist.
            server_round: The round that produced it, if any.
            metrics: Metrics to keep with it.
            set_head: Also move ``head`` to it, in the same transaction.

        Returns:
            The new version.

        Raises:
            InvalidInputError: Unknown kind or malformed metrics.
            NotFoundError: ``parent`` does not exist.
        """
        _check_choice("model kind", kind, MODEL_KINDS)
        metrics_json = _dump_metrics(metrics)
        with self._session(write=True) as session:
            if parent is not None and session.get(ModelRow, parent) is None:
                raise NotFoundError(f"model version {parent} not found")
            row = _insert_model(
                session,
                digest=digest,
                kind=kind,
                parent=parent,
                server_round=server_round,
                metrics_json=metrics_json,
            )
            if set_head:
                _set_ref(session, _HEAD, row.version)
            record = _model_record(row)
            session.commit()
        return record

    def head(self) -> ModelRecord | None:
        """Return the model ``head`` points at, or None before the first one."""
        with self._session() as session:
            ref = session.get(RefRow, _HEAD)
            if ref is None:
                return None
            row = session.get(ModelRow, ref.version)
            return None if row is None else _model_record(row)

    def get_model(self, version: int) -> ModelRecord:
        """Return one model version.

        Raises:
            NotFoundError: No such version.
        """
        with self._session() as session:
            row = session.get(ModelRow, version)
            if row is None:
                raise NotFoundError(f"model version {version} not found")
            return _model_record(row)

    def list_models(self, limit: int | None = None) -> list[ModelRecord]:
        """Return model versions, newest first.

        Args:
            limit: At most this many (the newest); None for all.
        """
        stmt = select(ModelRow).order_by(col(ModelRow.version).desc())
        if limit is not None:
            stmt = stmt.limit(_check_limit(limit))
        with self._session() as session:
            return [_model_record(row) for row in session.exec(stmt)]

    def referenced_digests(self) -> set[str]:
        """Return every digest the blob store must keep.

        That is every model's digest, plus the digests of accepted updates of rounds that have
        not reached a terminal status (they may still be aggregated).
        """
        updates = (
            select(UpdateRow.digest)
            .join(RoundRow, col(RoundRow.id) == col(UpdateRow.server_round))
            .where(
                col(UpdateRow.status) == "accepted",
                col(UpdateRow.digest) != "",
                col(RoundRow.status).not_in(TERMINAL),
            )
        )
        with self._session() as session:
            out = set(session.exec(select(ModelRow.digest)))
            out.update(session.exec(updates))
        return out

    # -- rounds -----------------------------------------------------------------------------

    def create_rounds(self, count: int, config: Mapping[str, Any] | None = None) -> list[int]:
        """Queue ``count`` rounds.

        Args:
            count: How many, at least 1.
            config: Per-round settings (JSON-serialisable), stored with each.

        Returns:
            The new round ids, ascending (global to the store, from 1).

        Raises:
            InvalidInputError: ``count`` < 1 or ``config`` is not JSON-serialisable.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"round count must be a positive integer, got {count!r}")
        config_json = _dump_json(dict(config or {}), "round config")
        now = time.time()
        with self._session(write=True) as session:
            rows = [
                RoundRow(status="queued", created=now, config=config_json) for _ in range(count)
            ]
            session.add_all(rows)
            session.flush()
            ids = [_row_id(row.id) for row in rows]
            session.commit()
        return sorted(ids)

    def get_round(self, round_id: int) -> RoundRecord:
        """Return one round.

        Raises:
            NotFoundError: No such round.
        """
        with self._session() as session:
            return _round_record(_get_round_row(session, round_id))

    def list_rounds(
        self, ids: Sequence[int] | None = None, limit: int | None = None
    ) -> list[RoundRecord]:
        """Return rounds in ascending id order.

        Args:
            ids: Only these rounds (ids that do not exist are left out); None for all.
            limit: Only the ``limit`` most recent of them (still returned ascending).
        """
        stmt = select(RoundRow).order_by(col(RoundRow.id).desc())
        if ids is not None:
            if not ids:
                return []
            stmt = stmt.where(col(RoundRow.id).in_(list(ids)))
        if limit is not None:
            stmt = stmt.limit(_check_limit(limit))
        with self._session() as session:
            rows = list(session.exec(stmt))
        return [_round_record(row) for row in reversed(rows)]

    def next_queued_round(self) -> RoundRecord | None:
        """Return the queued round with the lowest id, or None."""
        stmt = (
            select(RoundRow)
            .where(col(RoundRow.status) == "queued")
            .order_by(col(RoundRow.id))
            .limit(1)
        )
        with self._session() as session:
            row = session.exec(stmt).first()
            return None if row is None else _round_record(row)

    def open_rounds(self) -> list[RoundRecord]:
        """Return rounds in progress (neither queued nor terminal), ascending."""
        stmt = (
            select(RoundRow)
            .where(col(RoundRow.status).in_(_IN_PROGRESS))
            .order_by(col(RoundRow.id))
        )
        with self._session() as session:
            return [_round_record(row) for row in session.exec(stmt)]

    def set_round_status(
        self,
        round_id: int,
        status: str,
        *,
        reason: str | None = None,
        started: float | None = None,
        base_version: int | None = None,
        selected: Sequence[str] | None = None,
        deadline: float | None = None,
        ended: float | None = None,
    ) -> RoundRecord:
        """Move a round to ``status`` and set the fields given (None leaves a field as is).

        A terminal status (``failed``, ``cancelled``) sets ``ended`` to now unless given.
        ``committed`` is refused here: only :meth:`commit_round` commits, with its model.

        Returns:
            The round as updated.

        Raises:
            InvalidInputError: Unknown status, or ``committed``.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        _check_choice("round status", status, ROUND_STATUSES)
        if status == "committed":
            raise InvalidInputError("a round is committed only by commit_round, with its model")
        values: dict[str, Any] = {"status": status}
        if reason is not None:
            values["reason"] = reason
        if started is not None:
            values["started"] = started
        if base_version is not None:
            values["base_version"] = base_version
        if selected is not None:
            if isinstance(selected, str):
                raise InvalidInputError("selected must be a sequence of client ids, not a str")
            values["selected"] = json.dumps([str(c) for c in selected])
        if deadline is not None:
            values["deadline"] = deadline
        if ended is None and status in TERMINAL:
            ended = time.time()
        if ended is not None:
            values["ended"] = ended
        with self._session(write=True) as session:
            _guarded_round_update(session, round_id, values)
            record = _round_record(_get_round_row(session, round_id))
            session.commit()
        return record

    def commit_round(
        self, round_id: int, *, digest: str, metrics: Mapping[str, float], num_clients: int
    ) -> ModelRecord:
        """Commit a round and its aggregate, all in one transaction.

        Inserts the model (kind ``aggregate``, parent = the current head, ``server_round`` =
        ``round_id``), moves ``head`` to it, and marks the round committed with its model
        version, metrics, number of clients and end time. Nothing is written on failure.

        Args:
            round_id: The round.
            digest: SHA-256 of the aggregated model's blob.
            metrics: The round's metrics, kept on both the round and the model.
            num_clients: Number of updates in the aggregate.

        Returns:
            The new model version.

        Raises:
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        metrics_json = _dump_metrics(metrics)
        with self._session(write=True) as session:
            # The guarded update comes first so that a terminal round writes nothing at all.
            _guarded_round_update(
                session,
                round_id,
                {
                    "status": "committed",
                    "metrics": metrics_json,
                    "num_clients": num_clients,
                    "ended": time.time(),
                },
            )
            ref = session.get(RefRow, _HEAD)
            row = _insert_model(
                session,
                digest=digest,
                kind="aggregate",
                parent=None if ref is None else ref.version,
                server_round=round_id,
                metrics_json=metrics_json,
            )
            session.exec(
                update(RoundRow)
                .where(col(RoundRow.id) == round_id)
                .values(model_version=row.version)
            )
            _set_ref(session, _HEAD, row.version)
            record = _model_record(row)
            session.commit()
        return record

    def fail_round(self, round_id: int, reason: str, *, status: str = "failed") -> RoundRecord:
        """End a round without a model; ``head`` does not move.

        Args:
            round_id: The round.
            reason: Why, for the user.
            status: ``failed`` or ``cancelled``.

        Raises:
            InvalidInputError: ``status`` is neither.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        _check_choice("failure status", status, ("failed", "cancelled"))
        return self.set_round_status(round_id, status, reason=reason)

    # -- updates ----------------------------------------------------------------------------

    def add_update(
        self,
        *,
        server_round: int,
        client_id: str,
        task_id: str,
        status: str,
        reason: str = "",
        digest: str = "",
        size: int = 0,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
    ) -> UpdateRecord:
        """Record an update a client sent, accepted or rejected.

        The round is not required to exist: wrong-round updates are recorded as rejected.

        Raises:
            InvalidInputError: ``status`` is not ``accepted`` or ``rejected``, or bad metrics.
        """
        _check_choice("update status", status, UPDATE_STATUSES)
        row = UpdateRow(
            server_round=server_round,
            client_id=client_id,
            task_id=task_id,
            status=status,
            reason=reason,
            digest=digest,
            size=size,
            num_examples=num_examples,
            metrics=_dump_metrics(metrics),
            created=time.time(),
        )
        with self._session(write=True) as session:
            session.add(row)
            session.flush()
            record = _update_record(row)
            session.commit()
        return record

    def updates_for_round(self, server_round: int, status: str | None = None) -> list[UpdateRecord]:
        """Return a round's updates in the order they arrived.

        Args:
            server_round: The round.
            status: Only ``accepted`` or only ``rejected`` ones; None for both.
        """
        stmt = select(UpdateRow).where(col(UpdateRow.server_round) == server_round)
        if status is not None:
            _check_choice("update status", status, UPDATE_STATUSES)
            stmt = stmt.where(col(UpdateRow.status) == status)
        with self._session() as session:
            return [_update_record(r) for r in session.exec(stmt.order_by(col(UpdateRow.id)))]

    def has_accepted_update(self, server_round: int, client_id: str) -> bool:
        """Return whether ``client_id`` already has an accepted update in ``server_round``."""
        stmt = (
            select(UpdateRow.id)
            .where(
                col(UpdateRow.server_round) == server_round,
                col(UpdateRow.client_id) == client_id,
                col(UpdateRow.status) == "accepted",
            )
            .limit(1)
        )
        with self._session() as session:
            return session.exec(stmt).first() is not None

    # -- clients ----------------------------------------------------------------------------

    def upsert_client(
        self,
        client_id: str,
        *,
        fingerprint: str | None = None,
        state: str | None = None,
        seen: float | None = None,
        add_rounds: int = 0,
        add_bytes_up: int = 0,
        add_bytes_down: int = 0,
    ) -> ClientRecord:
        """Create or update a client; the ``add_*`` counters accumulate.

        A new client gets ``first_seen = last_seen = seen`` (now if None), fingerprint "" and
        state ``idle`` unless given. On an existing client, None leaves a field unchanged
        (``seen`` included) and ``last_seen`` never moves backwards.

        Raises:
            InvalidInputError: A negative counter increment.
        """
        for name, value in (
            ("add_rounds", add_rounds),
            ("add_bytes_up", add_bytes_up),
            ("add_bytes_down", add_bytes_down),
        ):
            if value < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
        with self._session(write=True) as session:
            row = session.get(ClientRow, client_id)
            if row is None:
                at = time.time() if seen is None else seen
                row = ClientRow(
                    client_id=client_id,
                    fingerprint=fingerprint or "",
                    state=state or "idle",
                    first_seen=at,
                    last_seen=at,
                    rounds_joined=add_rounds,
                    bytes_up=add_bytes_up,
                    bytes_down=add_bytes_down,
                )
                session.add(row)
            else:
                # Counters are incremented in SQL so that no concurrent writer is lost.
                values: dict[str, Any] = {
                    "rounds_joined": col(ClientRow.rounds_joined) + add_rounds,
                    "bytes_up": col(ClientRow.bytes_up) + add_bytes_up,
                    "bytes_down": col(ClientRow.bytes_down) + add_bytes_down,
                }
                if fingerprint is not None:
                    values["fingerprint"] = fingerprint
                if state is not None:
                    values["state"] = state
                if seen is not None:
                    values["last_seen"] = max(seen, row.last_seen)
                session.exec(
                    update(ClientRow)
                    .where(col(ClientRow.client_id) == client_id)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
            session.flush()
            session.refresh(row)
            record = _client_record(row)
            session.commit()
        return record

    def list_clients(self) -> list[ClientRecord]:
        """Return every known client, by id."""
        with self._session() as session:
            stmt = select(ClientRow).order_by(col(ClientRow.client_id))
            return [_client_record(row) for row in session.exec(stmt)]

    # -- events -----------------------------------------------------------------------------

    def append_event(
        self,
        type: str,
        *,
        server_round: int = 0,
        client_id: str = "",
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        """Append one event to the log.

        Args:
            type: One of the constants of :mod:`flctl.core.events`.
            server_round: The round it concerns, or 0.
            client_id: The client it concerns, or "".
            data: Type-specific details (JSON-serialisable).

        Returns:
            The event with its ``seq`` and ``time``.

        Raises:
            InvalidInputError: ``data`` is not JSON-serialisable.
        """
        data_dict = dict(data or {})
        row = EventRow(
            time=time.time(),
            type=type,
            server_round=server_round,
            client_id=client_id,
            data=_dump_json(data_dict, "event data"),
        )
        with self._session(write=True) as session:
            session.add(row)
            session.flush()
            event_ = _event(row)
            session.commit()
        return event_

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Return up to ``limit`` events with ``seq`` greater than the one given, ascending."""
        stmt = (
            select(EventRow)
            .where(col(EventRow.seq) > seq)
            .order_by(col(EventRow.seq))
            .limit(_check_limit(limit))
        )
        with self._session() as session:
            return [_event(row) for row in session.exec(stmt)]

    def last_event_seq(self) -> int:
        """Return the ``seq`` of the newest event, or 0 when the log is empty."""
        with self._session() as session:
            last = session.exec(select(func.max(EventRow.seq))).one()
        return int(last or 0)


# -- helpers ------------------------------------------------------------------------------------


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            # One connection shared by all threads, or each thread would see its own database.
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
    return create_engine(parsed, **kwargs)


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


def _check_choice(what: str, value: str, allowed: Any) -> None:
    if value not in allowed:
        raise InvalidInputError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidInputError(f"limit must be a non-negative integer, got {limit!r}")
    return limit


def _dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not JSON-serialisable: {exc}") from exc


def _dump_metrics(metrics: Mapping[str, float] | None) -> str:
    try:
        clean = {str(k): float(v) for k, v in (metrics or {}).items()}
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metrics must map names to numbers: {exc}") from exc
    return json.dumps(clean, sort_keys=True)


def _load_dict(text: str) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def _row_id(value: int | None) -> int:
    if value is None:  # pragma: no cover - flush always assigns the primary key
        raise StoreError("the database did not assign an id")
    return value


def _insert_model(
    session: Session,
    *,
    digest: str,
    kind: str,
    parent: int | None,
    server_round: int | None,
    metrics_json: str,
) -> ModelRow:
    last = session.exec(select(func.max(ModelRow.version))).one()
    row = ModelRow(
        version=int(last or 0) + 1,
        digest=digest,
        parent=parent,
        server_round=server_round,
        kind=kind,
        metrics=metrics_json,
        created=time.time(),
    )
    session.add(row)
    session.flush()
    return row


def _set_ref(session: Session, name: str, version: int) -> None:
    ref = session.get(RefRow, name)
    if ref is None:
        session.add(RefRow(name=name, version=version))
    else:
        ref.version = version
    session.flush()


def _get_round_row(session: Session, round_id: int) -> RoundRow:
    row = session.get(RoundRow, round_id)
    if row is None:
        raise NotFoundError(f"round {round_id} not found")
    return row


def _guarded_round_update(session: Session, round_id: int, values: dict[str, Any]) -> None:
    """Update a round only while it is not terminal (checked and written in one statement)."""
    result = session.exec(
        update(RoundRow)
        .where(col(RoundRow.id) == round_id, col(RoundRow.status).not_in(TERMINAL))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:
        row = _get_round_row(session, round_id)
        raise ConflictError(
            f"round {round_id} is already {row.status}",
            details={"round": round_id, "status": row.status},
        )


def _model_record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        version=row.version,
        digest=row.digest,
        parent=row.parent,
        server_round=row.server_round,
        kind=row.kind,
        metrics=_load_dict(row.metrics),
        created=row.created,
    )


def _round_record(row: RoundRow) -> RoundRecord:
    selected = json.loads(row.selected) if row.selected else []
    return RoundRecord(
        id=_row_id(row.id),
        status=row.status,
        created=row.created,
        started=row.started,
        ended=row.ended,
        base_version=row.base_version,
        model_version=row.model_version,
        num_clients=row.num_clients,
        selected=[str(c) for c in selected],
        metrics=_load_dict(row.metrics),
        reason=row.reason,
        deadline=row.deadline,
        config=_load_dict(row.config),
    )


def _update_record(row: UpdateRow) -> UpdateRecord:
    return UpdateRecord(
        id=_row_id(row.id),
        server_round=row.server_round,
        client_id=row.client_id,
        task_id=row.task_id,
        status=row.status,
        reason=row.reason,
        digest=row.digest,
        size=row.size,
        num_examples=row.num_examples,
        metrics=_load_dict(row.metrics),
        created=row.created,
    )


def _client_record(row: ClientRow) -> ClientRecord:
    return ClientRecord(
        client_id=row.client_id,
        fingerprint=row.fingerprint,
        state=row.state,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        rounds_joined=row.rounds_joined,
        bytes_up=row.bytes_up,
        bytes_down=row.bytes_down,
    )


def _event(row: EventRow) -> Event:
    return Event(
        seq=_row_id(row.seq),
        time=row.time,
        type=row.type,
        server_round=row.server_round,
        client_id=row.client_id,
        data=_load_dict(row.data),
    )
