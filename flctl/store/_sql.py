"""SqlStore: the coordinator's state (models, refs, rounds, updates, clients, events) in SQL.

The class is put together from one part per concern: :class:`Database` (engine, sessions,
transactions; ``_database.py``), the schema and its migrations (``_schema.py``), models, refs
and the registry (``_models.py``), rounds and updates (``_rounds.py``), clients
(``_clients.py``) and the event log (``_eventlog.py``); ``_rows.py`` holds what they share.
Every method is one short transaction on its own ``Session`` and returns frozen records from
``flctl.store._records`` (or :class:`flctl.core.events.Event`), never ORM rows. Only the ORM and
SQLAlchemy Core are used, so the URL may point at PostgreSQL as well as SQLite; the SQLite
pragmas are applied by a connect listener only when the dialect is SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from flctl.core.errors import (
    NotFoundError,
    StoreError,
    StoreLostError,
)
from flctl.store._backup import backup_database, set_aside_database, time_stamp
from flctl.store._clients import ClientStore
from flctl.store._eventlog import EventLog
from flctl.store._models import ModelStore
from flctl.store._rounds import RoundStore
from flctl.store._schema import MIGRATIONS, SCHEMA_VERSION
from flctl.store._state import (
    DATABASE,
    read_marker,
    require_store,
    write_marker,
)

__all__ = ["SqlStore"]


class SqlStore(ModelStore, RoundStore, ClientStore, EventLog):
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

    #: The schema this flctl writes (flctl.store._schema lists what each version added).
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

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
        if found in MIGRATIONS:
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
