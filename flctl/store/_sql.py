"""SqlStore: the coordinator's state (models, refs, rounds, updates, clients, events) in SQL.

Every method is one short transaction on its own ``Session`` and returns frozen records from
``flctl.store._records`` (or :class:`flctl.core.events.Event`), never ORM rows. Only the ORM and
SQLAlchemy Core are used, so the URL may point at PostgreSQL as well as SQLite; the SQLite
pragmas are applied by a connect listener only when the dialect is SQLite.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import quote

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateColumn
from sqlmodel import Session, col, select

from flctl.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StoreError,
    StoreLostError,
)
from flctl.core.events import Event
from flctl.store import (
    _ledger,  # noqa: F401  (registers its table before create_all)
    _revocations,  # noqa: F401  (registers its table before create_all)
)
from flctl.store._backup import backup_database, set_aside_database, time_stamp
from flctl.store._records import (
    MODEL_KINDS,
    MODEL_STATUSES,
    ROUND_STATUSES,
    TERMINAL,
    UPDATE_STATUSES,
    ClientRecord,
    ModelRecord,
    PendingRollbackRecord,
    RoundRecord,
    TagRecord,
    UpdateRecord,
)
from flctl.store._state import (
    DATABASE,
    corrupt_error,
    is_corruption,
    new_store_id,
    read_marker,
    require_store,
    write_marker,
)
from flctl.store._tables import (
    ClientRow,
    EventRow,
    MetaRow,
    ModelRow,
    PendingRollbackRow,
    RefRow,
    RoundRow,
    TableBase,
    TagRow,
    UpdateRow,
)

__all__ = ["SqlStore"]

_HEAD = "head"
_EVENTS = EventRow.__table__  # type: ignore[attr-defined]
_CLIENTS = ClientRow.__table__  # type: ignore[attr-defined]
_SCHEMA_KEY = "schema_version"
_STORE_ID_KEY = "store_id"
_IN_PROGRESS = tuple(s for s in ROUND_STATUSES if s != "queued" and s not in TERMINAL)
_DIGEST_PREFIX_RE = re.compile(r"[0-9a-f]{6,64}")
_SHORT_HEX_RE = re.compile(r"[0-9a-f]{1,5}")
_TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_MIN_PREFIX = 6


class SqlStore:
    """The coordinator's relational state, behind a small typed API.

    Args:
        url: A SQLAlchemy database URL, e.g. ``sqlite:///.flctl/state.db``, ``sqlite://``
            (in memory) or ``postgresql+psycopg://...``.
        read_only: Never write: no schema is created or migrated (the database must have the
            current schema), and writes fail. Use :meth:`open` for a state folder.

    Raises:
        SchemaMismatchError: The database was written with another schema version.
        CorruptStoreError: The database is damaged.
        StoreError: The database cannot be opened.

    Example:
        >>> store = SqlStore("sqlite://")
        >>> store.add_model(digest="ab" * 32, kind="initial", set_head=True).version
        1
        >>> store.close()
    """

    #: 1: models, refs, rounds, updates, clients, events. 2: the registry (tags; model status,
    #: reason, author, source, config). 3: rounds.tasks. 4: dp_ledger.unclipped_fraction and
    #: next_clip_norm (adaptive clipping). 5: pending_rollbacks (rollbacks deferred behind a
    #: running round survive a restart). 6: models.state_digest (the strategy's state with each
    #: version) and rounds.fit_config (the strategy's per-client fit config). 7: updates.scores,
    #: outlier and excluded (Byzantine detection). Older databases are migrated when opened.
    SCHEMA_VERSION: ClassVar[int] = 7

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
        # Read by the SQLite "begin" listener while self._lock is held: write transactions take
        # the write lock up front (BEGIN IMMEDIATE), so another process's commit between our
        # read and our write makes us wait (busy_timeout) instead of failing.
        self._is_write = False
        self._durable = True
        # The session of the open :meth:`transaction`, and the events written in the current
        # transaction, handed to :attr:`on_events` once it commits.
        self._batch: Session | None = None
        self._unpublished: list[Event] = []
        #: Called (on the committing thread) with the events of each committed transaction.
        self.on_events: Callable[[Sequence[Event]], None] | None = None
        try:
            self._engine = _make_engine(url)
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot open database {url!r}: {exc}") from exc
        if self._engine.dialect.name == "sqlite":
            connect = _sqlite_connect_read_only if read_only else _sqlite_connect
            event.listen(self._engine, "connect", connect)
            event.listen(self._engine, "begin", self._sqlite_begin)
        try:
            if read_only:
                self._check_schema()
            else:
                self._init_schema()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        read_only: bool = False,
        new_state: bool = False,
        deep_check: bool = False,
    ) -> SqlStore:
        """Open ``<state_dir>/state.db``; create it only in a folder that never held a store.

        A store is created (with its marker, ``store.json``) when the folder has no database
        and no trace of one (no marker, no blobs), or when ``new_state`` asks for it. A missing
        or empty database in a folder that held a store is refused, never replaced: that would
        start a new project over the old one's models and revocations.

        A writable open of an older schema backs the database up first (SQLite's online
        backup, into ``<state_dir>/backups/``), then migrates it; :attr:`backup_path` says
        where. A read-only open never creates, migrates or writes anything.

        Args:
            state_dir: The coordinator's state folder.
            read_only: Open with SQLite's ``mode=ro``; the store must exist with the current
                schema.
            new_state: Start a new store even though the folder held one: the old database,
                if any, is renamed to ``state.db.replaced-<time>``; blobs stay.
            deep_check: Run SQLite's ``quick_check`` over every page first.

        Returns:
            The store.

        Raises:
            StoreLostError: The database is missing or empty in a folder that held a store.
            CorruptStoreError: The database is damaged.
            NotFoundError: ``read_only`` and the folder never held a store.
            SchemaMismatchError: ``read_only`` and the schema is not the current one, or the
                database was written by a newer flctl.
        """
        state_dir = Path(state_dir)
        path = state_dir.resolve() / DATABASE
        if read_only:
            require_store(state_dir, deep=deep_check)
            store = cls(f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true", read_only=True)
            store.path = path
            return store
        replaced = None
        if new_state:
            replaced = set_aside_database(state_dir)
            info = None
        else:
            try:
                info = require_store(state_dir, deep=deep_check)
            except NotFoundError:
                info = None  # a fresh folder: this open creates its store
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state folder {str(state_dir)!r}: {exc}") from exc
        marker = read_marker(state_dir)
        if info is not None and marker is not None and info.store_id is not None:
            if marker.get("store_id") != info.store_id:
                raise StoreLostError(
                    f"{path} belongs to another store ({info.store_id}) than the one "
                    f"{state_dir / 'store.json'} names ({marker.get('store_id')})",
                    hint="restore this folder's own backup with `flctl store restore BACKUP`, "
                    "or start over knowingly with `flctl serve --new-state`",
                )
        backup_path = None
        found = info.schema_version if info is not None else None
        if found in _MIGRATIONS:
            backup_path = state_dir / "backups" / f"state-v{found}-{time_stamp()}.db"
            try:
                backup_path.parent.mkdir(exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {backup_path.parent}: {exc}") from exc
            backup_database(path, backup_path)
        store = cls(f"sqlite:///{path}")
        store.path = path
        store.replaced_path = replaced
        if backup_path is not None:
            store.backup_path = backup_path
            store.migrated_from = int(str(found))
        try:
            store_id = store.store_id
            if (
                marker is None
                or marker.get("store_id") != store_id
                or marker.get("schema_version") != cls.SCHEMA_VERSION
            ):
                write_marker(state_dir, store_id=store_id, schema_version=cls.SCHEMA_VERSION)
        except BaseException:
            store.close()
            raise
        return store

    @property
    def store_id(self) -> str:
        """The random id this store got when it was created (mirrored in ``store.json``)."""
        with self._session() as session:
            row = session.get(MetaRow, _STORE_ID_KEY)
            return "" if row is None else row.value

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
    def _session(self, *, write: bool = False, durable: bool = True) -> Iterator[Session]:
        """One short transaction; SQLAlchemy errors become flctl store errors, once, here.

        Inside :meth:`transaction` every call shares the one open session (same thread: the
        lock is reentrant and held for the whole transaction).

        ``durable=False`` (SQLite): the commit does not wait for the disk (``synchronous =
        NORMAL``). It still survives the process being killed; only a power loss may take it,
        and the next durable commit makes it durable too (one WAL file, written in order).
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

    def _commit(self, session: Session) -> None:
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
            with self._session(write=True) as session:
                self._batch = session
                try:
                    yield
                    session.commit()
                finally:
                    self._batch = None
                self._publish()  # before _session's exit, which drops unpublished events

    def _sqlite_begin(self, connection: Connection) -> None:
        if self._is_write:
            synchronous = "FULL" if self._durable else "NORMAL"
            if connection.info.get("synchronous") != synchronous:  # per connection
                connection.exec_driver_sql(f"PRAGMA synchronous={synchronous}")
                connection.info["synchronous"] = synchronous
        connection.exec_driver_sql("BEGIN IMMEDIATE" if self._is_write else "BEGIN")

    def _init_schema(self) -> None:
        with self._session(write=True) as session:
            inspector = inspect(session.connection())
            existing = set(inspector.get_table_names())
            if "meta" in existing:
                row = session.get(MetaRow, _SCHEMA_KEY)
                found = row.value if row is not None else None
                if row is not None and found in _MIGRATIONS:
                    # An older database: bring it up to date in this same transaction.
                    _migrate(session, int(row.value), self.SCHEMA_VERSION)
                    row.value = str(self.SCHEMA_VERSION)
                    session.add(row)
                elif found != str(self.SCHEMA_VERSION):
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
            if session.get(MetaRow, _STORE_ID_KEY) is None:
                session.add(MetaRow(key=_STORE_ID_KEY, value=new_store_id()))
            self._commit(session)

    def _check_schema(self) -> None:
        """A read-only store must already have this flctl's schema: it cannot migrate."""
        with self._session() as session:
            row = session.get(MetaRow, _SCHEMA_KEY)
        found = None if row is None else row.value
        if found == str(self.SCHEMA_VERSION):
            return
        older = found in _MIGRATIONS
        raise SchemaMismatchError(
            f"state database has schema version {found}, this flctl uses {self.SCHEMA_VERSION}",
            hint="start `flctl serve` once: it backs the database up, then migrates it"
            if older
            else "use the flctl version that wrote it",
            details={"found": found, "expected": self.SCHEMA_VERSION},
        )

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
        status: str = "ok",
        reason: str = "",
        author: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Record a new model version (the next number, from 1).

        Args:
            digest: SHA-256 of the model's blob.
            kind: ``initial``, ``aggregate``, ``rollback`` or ``import``.
            parent: The version it derives from, if any; must exist.
            server_round: The round that produced it, if any.
            metrics: Metrics to keep with it.
            set_head: Also move ``head`` to it, in the same transaction.
            status: ``ok`` or ``rejected`` (a rejected version never becomes head).
            reason: Why it was rejected or written, for the user.
            author: Who made it (``round``, an admin identity, ``local``, ``policy``).
            config: The strategy and settings it was produced with (JSON-serialisable).

        Returns:
            The new version.

        Raises:
            InvalidInputError: Unknown kind or status, malformed metrics or config, or
                ``set_head`` with a rejected status.
            NotFoundError: ``parent`` does not exist.
        """
        _check_choice("model kind", kind, MODEL_KINDS)
        _check_choice("model status", status, MODEL_STATUSES)
        if set_head and status == "rejected":
            raise InvalidInputError("a rejected model version cannot become head")
        metrics_json = _dump_metrics(metrics)
        config_json, config_hash = _dump_config(config)
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
                status=status,
                reason=reason,
                author=author,
                config_json=config_json,
                config_hash=config_hash,
            )
            if set_head:
                _set_ref(session, _HEAD, row.version)
            record = _model_record(row)
            self._commit(session)
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

    def list_models(
        self, limit: int | None = None, *, include_rejected: bool = True
    ) -> list[ModelRecord]:
        """Return model versions, newest first.

        Args:
            limit: At most this many (the newest); None for all.
            include_rejected: Include versions the validation gate rejected.
        """
        stmt = select(ModelRow).order_by(col(ModelRow.version).desc())
        if not include_rejected:
            stmt = stmt.where(col(ModelRow.status) != "rejected")
        if limit is not None:
            stmt = stmt.limit(_check_limit(limit))
        with self._session() as session:
            return [_model_record(row) for row in session.exec(stmt)]

    def referenced_digests(self) -> set[str]:
        """Return every digest the blob store must keep.

        That is every model's digest and strategy state's digest, plus the digests of accepted
        updates of rounds that have not reached a terminal status (they may still be
        aggregated).
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
            out.update(
                session.exec(select(ModelRow.state_digest).where(col(ModelRow.state_digest) != ""))
            )
        return out

    # -- the registry: references, lineage, tags, head moves ---------------------------------

    def resolve_model(self, ref: str) -> ModelRecord:
        """Find the model version a user means by ``ref``.

        In this order: an integer is a version; ``head`` is the head; a tag's name is the
        version it names; 6 to 64 lowercase hex characters are a digest prefix, which must
        match one digest (several versions may share it, after a rollback: the oldest, the
        one that produced those weights, is returned).

        Args:
            ref: What the user typed.

        Returns:
            The version.

        Raises:
            NotFoundError: Nothing matches.
            InvalidInputError: An empty ref, a hex prefix shorter than 6 characters, or a
                prefix that matches more than one digest.
        """
        ref = str(ref).strip()
        if not ref:
            raise InvalidInputError("empty model reference: give a version, a tag or a digest")
        if ref.isascii() and ref.isdigit():
            return self.get_model(int(ref))
        with self._session() as session:
            if ref == _HEAD:
                head = session.get(RefRow, _HEAD)
                if head is None:
                    raise NotFoundError("there is no head model yet")
                return _model_record(_get_model_row(session, head.version))
            tag = session.get(TagRow, ref)
            if tag is not None:
                return _model_record(_get_model_row(session, tag.version))
            if _DIGEST_PREFIX_RE.fullmatch(ref) is None:
                if _SHORT_HEX_RE.fullmatch(ref):
                    raise InvalidInputError(
                        f"digest prefix {ref!r} is too short: give at least {_MIN_PREFIX} "
                        "hex characters"
                    )
                raise NotFoundError(
                    f"no model version, tag or digest matches {ref!r}",
                    hint="list them with `flctl models ls --all`",
                )
            rows = list(
                session.exec(
                    select(ModelRow)
                    .where(col(ModelRow.digest).startswith(ref))
                    .order_by(col(ModelRow.version))
                )
            )
        if not rows:
            raise NotFoundError(
                f"no model version has a digest starting with {ref!r}",
                hint="list them with `flctl models ls --all`",
            )
        digests = {row.digest for row in rows}
        if len(digests) > 1:
            raise InvalidInputError(
                f"ambiguous digest prefix {ref!r} matches versions "
                f"{[row.version for row in rows]}: give more characters",
                details={"versions": [row.version for row in rows]},
            )
        return _model_record(rows[0])

    def lineage(self, version: int) -> list[ModelRecord]:
        """Return ``version`` and its parent chain, down to the version that has no parent.

        Raises:
            NotFoundError: No such version.
        """
        out: list[ModelRecord] = []
        seen: set[int] = set()
        with self._session() as session:
            row: ModelRow | None = _get_model_row(session, version)
            while row is not None and row.version not in seen:
                seen.add(row.version)
                out.append(_model_record(row))
                row = None if row.parent is None else session.get(ModelRow, row.parent)
        return out

    def versions_with_digest(self, digest: str) -> list[int]:
        """Return the versions whose blob is ``digest``, ascending."""
        stmt = (
            select(ModelRow.version)
            .where(col(ModelRow.digest) == digest)
            .order_by(col(ModelRow.version))
        )
        with self._session() as session:
            return [int(v) for v in session.exec(stmt)]

    def add_tag(
        self, version: int, name: str, *, author: str = "", force: bool = False
    ) -> TagRecord:
        """Name a model version.

        Args:
            version: The version.
            name: A letter, then up to 63 letters, digits, ``.``, ``_`` or ``-``; not ``head``
                and not something that reads as a digest prefix (6+ hex characters).
            author: Who sets it.
            force: Move the tag if it already names another version.

        Returns:
            The tag.

        Raises:
            InvalidInputError: A malformed or reserved name.
            NotFoundError: No such version.
            ConflictError: The tag names another version and ``force`` is not set.
        """
        _check_tag_name(name)
        with self._session(write=True) as session:
            _get_model_row(session, version)
            row = session.get(TagRow, name)
            if row is not None and row.version != version and not force:
                raise ConflictError(
                    f"tag {name!r} already names version {row.version}",
                    hint="pass --force to move it",
                    details={"tag": name, "version": row.version},
                )
            if row is None:
                row = TagRow(name=name, version=version, author=author, created=time.time())
                session.add(row)
            elif row.version != version:
                row.version, row.author, row.created = version, author, time.time()
                session.add(row)
            session.flush()
            record = _tag_record(row)
            self._commit(session)
        return record

    def remove_tag(self, name: str) -> TagRecord:
        """Delete a tag (the version stays).

        Returns:
            The tag as it was.

        Raises:
            NotFoundError: No such tag.
        """
        with self._session(write=True) as session:
            row = session.get(TagRow, name)
            if row is None:
                raise NotFoundError(f"tag {name!r} not found")
            record = _tag_record(row)
            session.delete(row)
            self._commit(session)
        return record

    def tags_for(self, version: int) -> list[str]:
        """Return the names of the tags on ``version``, sorted."""
        stmt = select(TagRow.name).where(col(TagRow.version) == version).order_by(col(TagRow.name))
        with self._session() as session:
            return [str(name) for name in session.exec(stmt)]

    def list_tags(self) -> list[TagRecord]:
        """Return every tag, by name."""
        with self._session() as session:
            return [_tag_record(row) for row in session.exec(select(TagRow).order_by(TagRow.name))]

    def set_head(
        self, version: int, *, kind: str = "rollback", author: str, reason: str = ""
    ) -> ModelRecord:
        """Make ``version``'s weights the head again, as a NEW version; history stays.

        Writes a version of kind ``kind`` whose digest, metrics, config and strategy state are
        those of ``version``, with parent = the current head and ``source`` = ``version``, and moves
        ``head`` to it, in one transaction. The caller records the event.

        Args:
            version: The version to go back (or forward) to.
            kind: The new version's kind (``rollback``).
            author: Who asks (an admin identity, ``local`` or ``policy``).
            reason: Why, for the history.

        Returns:
            The new head version.

        Raises:
            InvalidInputError: Unknown kind.
            NotFoundError: No such version.
            ConflictError: The head already holds those weights.
        """
        _check_choice("model kind", kind, MODEL_KINDS)
        with self._session(write=True) as session:
            target = _get_model_row(session, version)
            ref = session.get(RefRow, _HEAD)
            head = None if ref is None else session.get(ModelRow, ref.version)
            if head is not None and head.digest == target.digest:
                raise ConflictError(
                    f"the head (version {head.version}) already holds the weights of version "
                    f"{version} (digest {target.digest[:12]})",
                    details={"head": head.version, "version": version},
                )
            row = _insert_model(
                session,
                digest=target.digest,
                kind=kind,
                parent=None if head is None else head.version,
                server_round=None,
                metrics_json=target.metrics,
                status="ok",
                reason=reason,
                author=author,
                config_json=target.config_json,
                config_hash=target.config_hash,
                source=target.version,
                state_digest=target.state_digest,
            )
            _set_ref(session, _HEAD, row.version)
            record = _model_record(row)
            self._commit(session)
        return record

    def defer_rollback(
        self, source: int, *, author: str, reason: str, server_round: int
    ) -> PendingRollbackRecord:
        """Remember a rollback to ``source`` to apply when round ``server_round`` ends.

        Raises:
            NotFoundError: No such version.
        """
        row = PendingRollbackRow(
            source=source,
            author=author,
            reason=reason,
            server_round=server_round,
            created=time.time(),
        )
        with self._session(write=True) as session:
            _get_model_row(session, source)
            session.add(row)
            session.flush()
            record = _pending_record(row)
            self._commit(session)
        return record

    def pending_rollbacks(self) -> list[PendingRollbackRecord]:
        """Return the deferred rollbacks not yet applied, in the order they were asked for."""
        stmt = select(PendingRollbackRow).order_by(col(PendingRollbackRow.id))
        with self._session() as session:
            return [_pending_record(row) for row in session.exec(stmt)]

    def drop_pending_rollback(self, pending_id: int) -> None:
        """Forget a deferred rollback (applied, or failed); unknown ids are ignored."""
        with self._session(write=True) as session:
            row = session.get(PendingRollbackRow, pending_id)
            if row is not None:
                session.delete(row)
            self._commit(session)

    def import_model(
        self,
        digest: str,
        *,
        head: bool,
        author: str,
        metrics: Mapping[str, float] | None = None,
        reason: str = "",
    ) -> ModelRecord:
        """Record a model brought in from outside (its blob is already in the blob store).

        The new version has kind ``import`` and parent = the current head (the model it was
        validated against); ``head`` moves to it only when asked.

        Args:
            digest: SHA-256 of its blob.
            head: Also make it the head.
            author: Who imports it.
            metrics: Metrics to keep with it, if known.
            reason: A note for the history.

        Returns:
            The new version.
        """
        metrics_json = _dump_metrics(metrics)
        with self._session(write=True) as session:
            ref = session.get(RefRow, _HEAD)
            row = _insert_model(
                session,
                digest=digest,
                kind="import",
                parent=None if ref is None else ref.version,
                server_round=None,
                metrics_json=metrics_json,
                reason=reason,
                author=author,
            )
            if head:
                _set_ref(session, _HEAD, row.version)
            record = _model_record(row)
            self._commit(session)
        return record

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
            self._commit(session)
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
        tasks: Mapping[str, str] | None = None,
        fit_config: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> RoundRecord:
        """Move a round to ``status`` and set the fields given (None leaves a field as is).

        A terminal status (``failed``, ``cancelled``) sets ``ended`` to now unless given.
        ``committed`` and ``rejected`` are refused here: only :meth:`commit_round` ends a round
        with its model.

        Returns:
            The round as updated.

        Raises:
            InvalidInputError: Unknown status, or ``committed`` or ``rejected``.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        _check_choice("round status", status, ROUND_STATUSES)
        if status in ("committed", "rejected"):
            raise InvalidInputError(f"a round is {status} only by commit_round, with its model")
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
        if tasks is not None:
            values["tasks"] = json.dumps({str(k): str(v) for k, v in tasks.items()})
        if fit_config is not None:
            values["fit_config"] = _dump_json(
                {str(k): dict(v) for k, v in fit_config.items()}, "fit config"
            )
        if ended is None and status in TERMINAL:
            ended = time.time()
        if ended is not None:
            values["ended"] = ended
        with self._session(write=True) as session:
            _guarded_round_update(session, round_id, values)
            record = _round_record(_get_round_row(session, round_id))
            self._commit(session)
        return record

    def commit_round(
        self,
        round_id: int,
        *,
        digest: str,
        metrics: Mapping[str, float],
        num_clients: int,
        status: str = "ok",
        reason: str = "",
        state_digest: str = "",
    ) -> ModelRecord:
        """Commit a round and its aggregate, all in one transaction.

        Inserts the model (kind ``aggregate``, author ``round``, parent = the current head,
        ``server_round`` = ``round_id``, config = the round's config), moves ``head`` to it
        unless ``status`` is ``rejected``, and ends the round with its model version, metrics,
        number of clients and end time: as ``committed``, or as ``rejected`` (with ``reason``)
        when the gate refused the model. Nothing is written on failure.

        Args:
            round_id: The round.
            digest: SHA-256 of the aggregated model's blob.
            metrics: The round's metrics, kept on both the round and the model.
            num_clients: Number of updates in the aggregate.
            status: ``ok``, or ``rejected`` when the validation gate refused the aggregate:
                the version is stored with ``reason`` but ``head`` stays where it is.
            reason: Why it was rejected.
            state_digest: The blob of the strategy's state after this round, or "".

        Returns:
            The new model version.

        Raises:
            InvalidInputError: Unknown status.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        _check_choice("model status", status, MODEL_STATUSES)
        metrics_json = _dump_metrics(metrics)
        with self._session(write=True) as session:
            # The guarded update comes first so that a terminal round writes nothing at all.
            _guarded_round_update(
                session,
                round_id,
                {
                    "status": "committed" if status == "ok" else "rejected",
                    "metrics": metrics_json,
                    "num_clients": num_clients,
                    "ended": time.time(),
                    **({"reason": reason} if status == "rejected" else {}),
                },
            )
            ref = session.get(RefRow, _HEAD)
            round_row = _get_round_row(session, round_id)
            config_json, config_hash = _dump_config(_load_dict(round_row.config))
            row = _insert_model(
                session,
                digest=digest,
                kind="aggregate",
                parent=None if ref is None else ref.version,
                server_round=round_id,
                metrics_json=metrics_json,
                status=status,
                reason=reason,
                author="round",
                config_json=config_json,
                config_hash=config_hash,
                state_digest=state_digest,
            )
            session.exec(
                update(RoundRow)
                .where(col(RoundRow.id) == round_id)
                .values(model_version=row.version)
            )
            if status == "ok":
                _set_ref(session, _HEAD, row.version)
            record = _model_record(row)
            self._commit(session)
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
        scores: Mapping[str, float | None] | None = None,
    ) -> UpdateRecord:
        """Record an update a client sent, accepted or rejected.

        The round is not required to exist: wrong-round updates are recorded as rejected.
        ``scores`` are an accepted update's anomaly scores, when taken before it is recorded
        (as for :meth:`set_update_scores`).

        Raises:
            InvalidInputError: ``status`` is not ``accepted`` or ``rejected``, bad metrics or
                scores, or scores for a rejected update.
        """
        _check_choice("update status", status, UPDATE_STATUSES)
        if scores is not None and status != "accepted":
            raise InvalidInputError("only an accepted update has anomaly scores")
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
            scores=None if scores is None else _dump_scores(scores),
        )
        with self._session(write=True) as session:
            session.add(row)
            session.flush()
            record = _update_record(row)
            self._commit(session)
        return record

    def set_update_scores(
        self,
        update_id: int,
        scores: Mapping[str, float | None] | None = None,
        *,
        outlier: str = "",
        excluded: bool = False,
    ) -> UpdateRecord:
        """Record an accepted update's anomaly scores, and what the outlier rule made of it.

        Each call sets all three: call it when the update is scored, and again once the round
        has all its scores (a whole-round strategy's ``median_distance``, the rule's verdict).

        Args:
            update_id: The update (:attr:`UpdateRecord.id`).
            scores: Score name -> a finite number or None (``AnomalyScores.to_dict()``); None
                keeps the scores already recorded.
            outlier: Why the rule marked it (``Outlier.reason``), or "" when it did not.
            excluded: It was left out of the aggregate (``exclude_outliers = "drop"``); needs
                an ``outlier`` reason.

        Raises:
            NotFoundError: No such update.
            InvalidInputError: It was rejected, scores that are not finite numbers, or
                ``excluded`` without a reason.
        """
        if excluded and not outlier:
            raise InvalidInputError("an excluded update needs the outlier rule's reason")
        dumped = None if scores is None else _dump_scores(scores)
        with self._session(write=True) as session:
            row = session.get(UpdateRow, update_id)
            if row is None:
                raise NotFoundError(f"no update {update_id}")
            if row.status != "accepted":
                raise InvalidInputError(
                    f"update {update_id} was {row.status}: only an accepted update is scored"
                )
            if dumped is not None:
                row.scores = dumped
            row.outlier = outlier
            row.excluded = excluded
            session.add(row)
            session.flush()
            record = _update_record(row)
            self._commit(session)
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
            self._commit(session)
        return record

    def bump_client(
        self,
        client_id: str,
        *,
        state: str | None = None,
        seen: float | None = None,
        add_rounds: int = 0,
        add_bytes_up: int = 0,
        add_bytes_down: int = 0,
    ) -> None:
        """:meth:`upsert_client` for the hot paths: one UPDATE, nothing read back.

        Not durable on its own (counters and state are informational); a client not seen
        before is created through :meth:`upsert_client`.
        """
        for name, value in (
            ("add_rounds", add_rounds),
            ("add_bytes_up", add_bytes_up),
            ("add_bytes_down", add_bytes_down),
        ):
            if value < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
        values: dict[str, Any] = {}
        if add_rounds:
            values["rounds_joined"] = _CLIENTS.c.rounds_joined + add_rounds
        if add_bytes_up:
            values["bytes_up"] = _CLIENTS.c.bytes_up + add_bytes_up
        if add_bytes_down:
            values["bytes_down"] = _CLIENTS.c.bytes_down + add_bytes_down
        if state is not None:
            values["state"] = state
        if seen is not None:
            last = _CLIENTS.c.last_seen
            values["last_seen"] = case((last < seen, seen), else_=last)  # never backwards
        if not values:
            return
        with self._session(write=True, durable=False) as session:
            result = session.connection().execute(
                update(_CLIENTS).where(_CLIENTS.c.client_id == client_id).values(**values)
            )
            found = result.rowcount > 0
            self._commit(session)
        if not found:
            self.upsert_client(
                client_id,
                state=state,
                seen=seen,
                add_rounds=add_rounds,
                add_bytes_up=add_bytes_up,
                add_bytes_down=add_bytes_down,
            )

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
        durable: bool = True,
    ) -> Event:
        """Append one event to the log.

        Args:
            type: One of the constants of :mod:`flctl.core.events`.
            server_round: The round it concerns, or 0.
            client_id: The client it concerns, or "".
            data: Type-specific details (JSON-serialisable).
            durable: False for an informational event whose commit need not wait for the
                disk (see :meth:`_session`); inside :meth:`transaction` the transaction decides.

        Returns:
            The event with its ``seq`` and ``time``.

        Raises:
            InvalidInputError: ``data`` is not JSON-serialisable.
        """
        data_dict = dict(data or {})
        now = time.time()
        values = {
            "time": now,
            "type": type,
            "server_round": server_round,
            "client_id": client_id,
            "data": _dump_json(data_dict, "event data"),
        }
        with self._session(write=True, durable=durable) as session:
            # Core INSERT: the ORM's unit of work costs more than the insert itself here
            result = session.connection().execute(insert(_EVENTS).values(**values))
            (seq,) = result.inserted_primary_key or (None,)
            event_ = Event(
                seq=_row_id(seq),
                time=now,
                type=type,
                server_round=server_round,
                client_id=client_id,
                data=data_dict,
            )
            self._unpublished.append(event_)
            self._commit(session)
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


def _check_choice(what: str, value: str, allowed: Any) -> None:
    if value not in allowed:
        raise InvalidInputError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def _check_tag_name(name: str) -> None:
    if not isinstance(name, str) or _TAG_RE.fullmatch(name) is None:
        raise InvalidInputError(
            f"invalid tag name {name!r}: a letter, then up to 63 letters, digits, '.', '_' or '-'"
        )
    if name == _HEAD:
        raise InvalidInputError("'head' is reserved: it always names the head model")
    if _DIGEST_PREFIX_RE.fullmatch(name):
        raise InvalidInputError(
            f"tag name {name!r} reads as a digest prefix; add a letter outside a-f"
        )


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


def _dump_scores(scores: Mapping[str, float | None]) -> str:
    """Anomaly scores as JSON: names to finite numbers, or null where not computed."""
    clean: dict[str, float | None] = {}
    for key, value in scores.items():
        if value is None:
            clean[str(key)] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"anomaly score {key!r} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise InvalidInputError(f"anomaly score {key!r} must be finite, not {value!r}")
        clean[str(key)] = float(value)
    return json.dumps(clean, sort_keys=True)


def _load_scores(text: str | None) -> dict[str, float | None] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def _dump_config(config: Mapping[str, Any] | None) -> tuple[str, str]:
    """Return a config's canonical JSON and its SHA-256 ("" for an empty config)."""
    if not config:
        return "{}", ""
    canonical = _dump_json(dict(config), "model config")
    return canonical, hashlib.sha256(canonical.encode()).hexdigest()


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
    status: str = "ok",
    reason: str = "",
    author: str = "",
    config_json: str = "{}",
    config_hash: str = "",
    source: int | None = None,
    state_digest: str = "",
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
        status=status,
        reason=reason,
        author=author,
        source=source,
        config_json=config_json,
        config_hash=config_hash,
        state_digest=state_digest,
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


def _get_model_row(session: Session, version: int) -> ModelRow:
    row = session.get(ModelRow, version)
    if row is None:
        raise NotFoundError(f"model version {version} not found")
    return row


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
        status=row.status,
        reason=row.reason,
        author=row.author,
        source=row.source,
        config=_load_dict(row.config_json),
        config_hash=row.config_hash,
        state_digest=row.state_digest or "",
    )


def _tag_record(row: TagRow) -> TagRecord:
    return TagRecord(name=row.name, version=row.version, author=row.author, created=row.created)


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
        tasks={str(k): str(v) for k, v in _load_dict(row.tasks or "{}").items()},
        fit_config={
            str(k): dict(v)
            for k, v in _load_dict(row.fit_config or "{}").items()
            if isinstance(v, dict)
        },
    )


def _pending_record(row: PendingRollbackRow) -> PendingRollbackRecord:
    return PendingRollbackRecord(
        id=_row_id(row.id),
        source=row.source,
        author=row.author,
        reason=row.reason,
        server_round=row.server_round,
        created=row.created,
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
        scores=_load_scores(row.scores),
        outlier=row.outlier or "",
        is_excluded=bool(row.excluded),
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


# -- schema migrations --------------------------------------------------------------------------


def _add_missing_columns(connection: Connection, table: Table) -> list[str]:
    """``ALTER TABLE ... ADD COLUMN`` for each column of ``table`` the database lacks.

    The DDL is rendered by SQLAlchemy for the connection's dialect (SQLite, PostgreSQL), and
    every added column is nullable or has a server default, so existing rows stay valid.
    """
    have = {c["name"] for c in inspect(connection).get_columns(table.name)}
    preparer = connection.dialect.identifier_preparer
    added = []
    for column in table.columns:
        if column.name in have:
            continue
        spec = CreateColumn(column).compile(dialect=connection.dialect)
        connection.execute(text(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {spec}"))
        added.append(column.name)
    return added


def _migrate_1_to_2(session: Session) -> None:
    """Add the registry: model status/reason/author/source/config columns and the tags table.

    Aggregates get author ``round`` and the config of the round that produced them.
    """
    connection = session.connection()
    table = TableBase.metadata.tables[ModelRow.__tablename__]
    _add_missing_columns(connection, table)
    TableBase.metadata.create_all(connection, tables=[TableBase.metadata.tables["tags"]])
    produced = session.exec(
        select(ModelRow.version, RoundRow.config).join(
            RoundRow, col(RoundRow.id) == col(ModelRow.server_round)
        )
    )
    for version, config in list(produced):
        config_json, config_hash = _dump_config(_load_dict(config))
        session.exec(
            update(ModelRow)
            .where(col(ModelRow.version) == version)
            .values(config_json=config_json, config_hash=config_hash)
            .execution_options(synchronize_session=False)
        )
    session.exec(
        update(ModelRow)
        .where(col(ModelRow.kind) == "aggregate", col(ModelRow.author) == "")
        .values(author="round")
        .execution_options(synchronize_session=False)
    )


def _migrate_2_to_3(session: Session) -> None:
    """Add rounds.tasks (the selected clients' task ids, for resuming a round after a restart)."""
    _add_missing_columns(session.connection(), TableBase.metadata.tables[RoundRow.__tablename__])


def _migrate_3_to_4(session: Session) -> None:
    """Add dp_ledger.unclipped_fraction and next_clip_norm (adaptive clipping).

    A database without a ledger gets the whole table from ``create_all`` afterwards.
    """
    connection = session.connection()
    if inspect(connection).has_table("dp_ledger"):
        _add_missing_columns(connection, TableBase.metadata.tables["dp_ledger"])


def _migrate_4_to_5(session: Session) -> None:
    """Nothing to alter: ``create_all`` adds the pending_rollbacks table afterwards."""


def _migrate_5_to_6(session: Session) -> None:
    """Add models.state_digest (the strategy's state) and rounds.fit_config."""
    connection = session.connection()
    for name in (ModelRow.__tablename__, RoundRow.__tablename__):
        _add_missing_columns(connection, TableBase.metadata.tables[name])


def _migrate_6_to_7(session: Session) -> None:
    """Add updates.scores, outlier and excluded (Byzantine detection)."""
    _add_missing_columns(session.connection(), TableBase.metadata.tables[UpdateRow.__tablename__])


#: schema version found -> the step that brings it to the next version.
_MIGRATIONS = {
    "1": _migrate_1_to_2,
    "2": _migrate_2_to_3,
    "3": _migrate_3_to_4,
    "4": _migrate_4_to_5,
    "5": _migrate_5_to_6,
    "6": _migrate_6_to_7,
}


def _migrate(session: Session, found: int, target: int) -> None:
    for version in range(found, target):
        _MIGRATIONS[str(version)](session)
