"""The state folder's own record of its store: the marker, the traces a store leaves, a probe.

A state folder that ever held a store says so in three ways: its marker ``store.json`` (written
when the store is created: a store id and the schema version, mirrored in the database's
``meta`` table), its blobs, and the database itself. When the database is missing or empty but
the marker or a blob is there, the store was lost: flctl refuses to start a new one in its
place (:class:`~flctl.core.errors.StoreLostError`) and says how to restore it. Only a folder
with none of these traces gets a new store without being asked.

The probe reads the database with the standard library's ``sqlite3``, read-only and, when no
write-ahead log exists, as immutable, so that probing a damaged file never writes beside it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flctl.core.errors import CorruptStoreError, NotFoundError, StoreError, StoreLostError

__all__ = [
    "DATABASE",
    "MARKER",
    "DatabaseInfo",
    "connect_read_only",
    "corrupt_error",
    "is_corruption",
    "new_store_id",
    "probe_database",
    "read_marker",
    "require_store",
    "store_traces",
    "write_marker",
]

#: The database's file name in the state folder.
DATABASE = "state.db"
#: The marker's file name in the state folder.
MARKER = "store.json"
_MARKER_FORMAT = "flctl-store"
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: What SQLite says when the file is damaged (the driver raises DatabaseError for all of them).
_CORRUPT_WORDS = ("malformed", "not a database", "could not decode", "corrupt", "disk image")

_RESTORE_HINT = (
    "restore it with `flctl store restore BACKUP` (a folder written by `flctl store backup`), "
    "or start over knowingly with `flctl serve --new-state` (nothing is deleted)"
)


@dataclass(frozen=True)
class DatabaseInfo:
    """What the probe read from a database: its tables, schema version and store id."""

    path: Path
    tables: frozenset[str]
    schema_version: str | None
    store_id: str | None


def new_store_id() -> str:
    """A fresh random store id."""
    return uuid.uuid4().hex


def is_corruption(exc: BaseException) -> bool:
    """Whether a driver error means the database file is damaged (not busy, not read-only)."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    if type(exc) is sqlite3.DatabaseError:  # "file is not a database", "malformed", ...
        return True
    return any(word in str(exc).lower() for word in _CORRUPT_WORDS)


def corrupt_error(path: Path, exc: BaseException) -> CorruptStoreError:
    """The one error every damaged-database symptom becomes."""
    reason = (
        "text that is not UTF-8"
        if isinstance(exc, UnicodeDecodeError)
        else str(exc).splitlines()[0][:200]
    )
    return CorruptStoreError(
        f"state database is corrupt: {path} ({reason})",
        hint=_RESTORE_HINT,
        details={"path": str(path)},
    )


def read_marker(state_dir: Path) -> dict[str, Any] | None:
    """The marker's contents, or None when the folder has none.

    Raises:
        StoreError: The marker exists but cannot be read as flctl's marker.
    """
    path = Path(state_dir) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the store marker {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
        raise StoreError(f"{path} is not a flctl store marker")
    return data


def write_marker(state_dir: Path, *, store_id: str, schema_version: int | str) -> Path:
    """Write (atomically) the marker naming this folder's store.

    Returns:
        The marker's path.
    """
    path = Path(state_dir) / MARKER
    document = {
        "format": _MARKER_FORMAT,
        "store_id": store_id,
        "schema_version": int(schema_version),
        "database": DATABASE,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    temp = path.with_name(f".{MARKER}.tmp")
    try:
        with temp.open("w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the store marker {path}: {exc}") from exc
    return path


def store_traces(state_dir: Path) -> list[str]:
    """What in ``state_dir`` shows that a store lived there (empty for a fresh folder).

    The marker, a write-ahead log with content, and any blob count; the lock file, serve.json,
    uploads and empty folders do not (a command may leave them without creating a store).
    """
    state_dir = Path(state_dir)
    found = []
    if (state_dir / MARKER).exists():
        found.append(MARKER)
    wal = state_dir / f"{DATABASE}-wal"
    if wal.is_file() and wal.stat().st_size > 0:
        found.append(wal.name)
    objects = state_dir / "blobs" / "sha256"
    if objects.is_dir():
        for shard in objects.iterdir():
            if shard.is_dir() and any(p.is_file() for p in shard.iterdir()):
                found.append("blobs")
                break
    return found


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only ``sqlite3`` connection that writes nothing beside the file.

    Without a write-ahead log the file is opened as immutable (no -wal or -shm is created);
    with one, read-only through the log, so that committed transactions are seen.
    """
    wal = path.with_name(f"{path.name}-wal")
    query = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    return sqlite3.connect(f"file:{quote(str(path))}?{query}", uri=True)


def probe_database(path: Path, *, deep: bool = False) -> DatabaseInfo:
    """Check that ``path`` is a readable flctl database; read its schema version and store id.

    Args:
        path: The database file, which must exist.
        deep: Also run SQLite's ``quick_check`` over every page (proportional to the size).

    Raises:
        CorruptStoreError: The file is not SQLite, or SQLite finds it damaged.
        StoreError: It cannot be read (permissions).
    """
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if header != _SQLITE_MAGIC:
        raise corrupt_error(path, ValueError("not an SQLite database file"))
    try:
        connection = connect_read_only(path)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from exc
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        meta: dict[str, str] = {}
        if "meta" in tables:
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        if deep:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise corrupt_error(path, ValueError("; ".join(problems)))
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        if is_corruption(exc):
            raise corrupt_error(path, exc) from exc
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        connection.close()
    return DatabaseInfo(path, frozenset(tables), meta.get("schema_version"), meta.get("store_id"))


def require_store(state_dir: Path, *, deep: bool = False) -> DatabaseInfo:
    """The state folder's database, probed; refuse when it is missing, empty or damaged.

    Used by every command that reads or changes an existing store: none of them may create one.

    Raises:
        StoreLostError: The database is missing or empty but the folder shows a store lived
            there (marker, blobs).
        NotFoundError: The folder never held a store.
        CorruptStoreError: The database is damaged.
    """
    state_dir = Path(state_dir)
    path = state_dir / DATABASE
    is_empty = not path.is_file() or path.stat().st_size == 0
    info = None if is_empty else probe_database(path, deep=deep)
    if info is not None and info.tables:
        return info  # its schema version is the store's to judge
    traces = store_traces(state_dir)
    if traces:
        what = "is missing" if not path.exists() else "is empty"
        raise StoreLostError(
            f"the state database {path} {what}, but {state_dir} held a store "
            f"({', '.join(traces)}); flctl will not start a new one in its place",
            hint=_RESTORE_HINT,
            details={"path": str(path), "traces": traces},
        )
    raise NotFoundError(
        f"no state store in {state_dir}",
        hint="start the coordinator once with `flctl serve` to create it",
    )
