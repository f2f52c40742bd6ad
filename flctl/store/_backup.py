"""Backups of the state store: the database (SQLite's online backup) and a manifest of its blobs.

A backup is a folder holding ``state.db``, a consistent copy taken with SQLite's online backup
API (safe while a coordinator writes), and ``manifest.json``: the copy's sha256, the store id
and schema version, and every blob the copy references with its size. Blobs are immutable and
content-addressed, so they are not copied: :func:`restore_backup` checks that each one is still
in the blob folder with the right size and sha256 before it puts the database in place.

Restoring never deletes: a database it replaces (even an empty or damaged one) is renamed to
``state.db.replaced-<time>``, together with its ``-wal`` and ``-shm`` files.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.core.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StoreError,
)
from flctl.store._blobs import sha256_file
from flctl.store._records import TERMINAL
from flctl.store._state import (
    DATABASE,
    DatabaseInfo,
    connect_read_only,
    corrupt_error,
    is_corruption,
    new_store_id,
    probe_database,
    read_marker,
    require_store,
    write_marker,
)

__all__ = [
    "MANIFEST",
    "BackupReport",
    "RestoreReport",
    "backup_database",
    "restore_backup",
    "set_aside_database",
    "time_stamp",
    "write_backup",
]

#: The manifest's file name in a backup folder.
MANIFEST = "manifest.json"
_FORMAT = "flctl-store-backup"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BackupReport:
    """What :func:`write_backup` wrote."""

    path: Path
    store_id: str | None
    schema_version: int
    database_bytes: int
    blobs: int
    blob_bytes: int
    #: Digests the database references that were already missing from the blob folder.
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore_backup` did."""

    path: Path
    store_id: str | None
    schema_version: int
    blobs: int
    #: Where the database it replaced was moved (None when there was none).
    replaced: Path | None


def time_stamp() -> str:
    """A UTC time for file names, unique within the process (``20250101-120000-123456789``)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_database(source: Path, target: Path) -> None:
    """Copy the database ``source`` to ``target`` with SQLite's online backup API.

    The copy is one consistent snapshot even while another process writes ``source``; it is
    written beside ``target``, fsynced, then renamed into place.

    Raises:
        CorruptStoreError: SQLite found ``source`` damaged.
        StoreError: Either file cannot be read or written.
    """
    temp = target.with_name(f".{target.name}.partial")
    try:
        src = connect_read_only(source)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {source}: {exc}") from exc
    try:
        temp.unlink(missing_ok=True)
        dst = sqlite3.connect(temp)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        temp.unlink(missing_ok=True)
        if is_corruption(exc):
            raise corrupt_error(source, exc) from exc
        raise StoreError(f"cannot back up {source} to {target}: {exc}") from exc
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StoreError(f"cannot back up {source} to {target}: {exc}") from exc
    finally:
        src.close()


def _referenced(database: Path) -> set[str]:
    """The digests the blob folder must keep for ``database`` (as ``referenced_digests``).

    Plain SQL over table and column names every schema version has (and, from schema 6, the
    strategies' states), so that a backup of an older database can be checked too.
    """
    terminal = sorted(TERMINAL)
    marks = ", ".join("?" for _ in terminal)
    connection = connect_read_only(database)
    try:
        rows = connection.execute(
            "SELECT digest FROM models UNION SELECT u.digest FROM updates u "
            "JOIN rounds r ON r.id = u.server_round "
            f"WHERE u.status = 'accepted' AND u.digest != '' AND r.status NOT IN ({marks})",
            terminal,
        ).fetchall()
        columns = {str(c[1]) for c in connection.execute("PRAGMA table_info(models)")}
        if "state_digest" in columns:  # schema 6: the strategies' states
            rows += connection.execute(
                "SELECT state_digest FROM models WHERE state_digest != ''"
            ).fetchall()
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        if is_corruption(exc):
            raise corrupt_error(database, exc) from exc
        raise StoreError(f"cannot read {database}: {exc}") from exc
    finally:
        connection.close()
    return {str(row[0]) for row in rows}


def _blob_path(blobs: Path, digest: str) -> Path:
    return blobs / "sha256" / digest[:2] / digest[2:]


def _schema(info: DatabaseInfo) -> int:
    try:
        return int(info.schema_version or "")
    except ValueError:
        raise SchemaMismatchError(
            f"{info.path} has no valid schema version ({info.schema_version!r})"
        ) from None


def write_backup(state_dir: Path, target: Path) -> BackupReport:
    """Back up the store in ``state_dir`` into the new folder ``target``.

    Args:
        state_dir: The coordinator's state folder (a coordinator may be running).
        target: A folder that does not exist yet, or is empty.

    Raises:
        StoreLostError: There is no database to back up (see :func:`require_store`).
        CorruptStoreError: The database or the copy is damaged.
        ConflictError: ``target`` exists and is not an empty folder.
    """
    state_dir = Path(state_dir)
    target = Path(target)
    require_store(state_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConflictError(f"{target} already exists", hint="name a new folder for each backup")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {target}: {exc}") from exc
    copy = target / DATABASE
    backup_database(state_dir / DATABASE, copy)
    info = probe_database(copy, deep=True)
    blobs_root = state_dir / "blobs"
    entries: list[dict[str, Any]] = []
    missing: list[str] = []
    for digest in sorted(_referenced(copy)):
        try:
            entries.append(
                {"digest": digest, "size": _blob_path(blobs_root, digest).stat().st_size}
            )
        except OSError:
            missing.append(digest)
    manifest = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store_id": info.store_id,
        "schema_version": _schema(info),
        "source": str(state_dir),
        "database": {
            "file": DATABASE,
            "sha256": sha256_file(copy),
            "size": copy.stat().st_size,
        },
        "blobs": entries,
        "missing_blobs": missing,
    }
    temp = target / f".{MANIFEST}.partial"
    try:
        with temp.open("w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target / MANIFEST)
        _fsync_dir(target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {target / MANIFEST}: {exc}") from exc
    return BackupReport(
        path=target,
        store_id=info.store_id,
        schema_version=_schema(info),
        database_bytes=copy.stat().st_size,
        blobs=len(entries),
        blob_bytes=sum(int(e["size"]) for e in entries),
        missing=missing,
    )


def _read_manifest(source: Path) -> dict[str, Any]:
    path = source / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(
            f"{source} is not a backup ({MANIFEST} is missing)",
            hint="name a folder written by `flctl store backup`",
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise InvalidInputError(f"{path} is not a flctl backup manifest")
    if manifest.get("format_version") != _FORMAT_VERSION:
        raise SchemaMismatchError(
            f"{path} has backup format {manifest.get('format_version')!r}, "
            f"this flctl reads {_FORMAT_VERSION}"
        )
    blobs = manifest.get("blobs")
    database = manifest.get("database")
    if not isinstance(blobs, list) or not isinstance(database, dict):
        raise InvalidInputError(f"{path} lacks its blob list or database entry")
    return manifest


def _check_blobs(manifest: dict[str, Any], blobs_root: Path) -> list[str]:
    """Each problem with the manifest's blobs, as a line (empty when all are intact)."""
    problems = []
    for entry in manifest["blobs"]:
        digest, size = entry.get("digest"), entry.get("size")
        if not isinstance(digest, str) or len(digest) != 64 or not isinstance(size, int):
            problems.append(f"malformed manifest entry {entry!r}")
            continue
        path = _blob_path(blobs_root, digest)
        if not path.is_file():
            problems.append(f"missing: {digest}")
        elif path.stat().st_size != size:
            problems.append(f"altered: {digest} ({path.stat().st_size} bytes, expected {size})")
        elif sha256_file(path) != digest:
            problems.append(f"altered: {digest} (its bytes hash differently)")
    return problems


def set_aside_database(state_dir: Path) -> Path | None:
    """Rename the current database (and its -wal, -shm) out of the way; never delete it."""
    database = state_dir / DATABASE
    if not database.exists():
        # A log without its database: move it too, or SQLite would replay it into ours.
        if not any((state_dir / f"{DATABASE}{s}").exists() for s in ("-wal", "-shm")):
            return None
    aside = state_dir / f"{DATABASE}.replaced-{time_stamp()}"
    for suffix in ("", "-wal", "-shm"):
        path = state_dir / f"{DATABASE}{suffix}"
        if path.exists():
            os.replace(path, aside.with_name(aside.name + suffix))
    return aside


def _marker_id(state_dir: Path) -> str | None:
    try:
        marker = read_marker(state_dir)
    except StoreError:
        return None
    return None if marker is None else str(marker.get("store_id") or "") or None


def _set_store_id(database: Path, store_id: str) -> None:
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('store_id', ?)", (store_id,)
            )
    finally:
        connection.close()


def restore_backup(
    state_dir: Path, source: Path, *, schema_version: int, force: bool = False
) -> RestoreReport:
    """Put the backup in ``source`` in place as the store of ``state_dir``.

    Every check runs before anything in ``state_dir`` changes: the copy's sha256 against the
    manifest, SQLite's ``quick_check``, the manifest against the copy's references, and every
    blob in the manifest against the blob folder (present, same size, same sha256). The caller
    holds the state folder's lock (no coordinator runs).

    Args:
        state_dir: The state folder to restore into.
        source: A folder written by :func:`write_backup`.
        schema_version: The newest schema this flctl reads (a newer backup is refused).
        force: Replace a database that is intact (it is kept, renamed).

    Raises:
        IntegrityError: The copy or a blob does not match the manifest.
        CorruptStoreError: The copy is damaged.
        SchemaMismatchError: The backup was written by a newer flctl.
        ConflictError: The current database is intact and ``force`` is off.
    """
    state_dir = Path(state_dir)
    source = Path(source)
    manifest = _read_manifest(source)
    copy = source / str(manifest["database"].get("file", DATABASE))
    if not copy.is_file():
        raise NotFoundError(f"the backup's database {copy} is missing")
    if sha256_file(copy) != manifest["database"].get("sha256"):
        raise IntegrityError(
            f"the backup's database {copy} does not match its manifest (sha256 differs)",
            hint="restore another backup",
        )
    info = probe_database(copy, deep=True)
    found = _schema(info)
    if found > schema_version:
        raise SchemaMismatchError(
            f"the backup has schema version {found}, this flctl reads up to {schema_version}",
            hint="restore it with the flctl version that wrote it",
        )
    listed = {e.get("digest") for e in manifest["blobs"] if isinstance(e, dict)}
    unlisted = _referenced(copy) - listed - set(manifest.get("missing_blobs") or [])
    if unlisted:
        raise IntegrityError(
            f"the backup's manifest omits {len(unlisted)} blob(s) its database references",
            hint="restore another backup",
        )
    problems = _check_blobs(manifest, state_dir / "blobs")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        shown = "; ".join(problems[:5]) + more
        raise IntegrityError(
            f"{len(problems)} of {len(manifest['blobs'])} blobs the backup needs are missing "
            f"or altered in {state_dir / 'blobs'}: {shown}",
            hint="put the blob folder back (from a file backup) before restoring the database",
            details={"problems": problems},
        )
    current = state_dir / DATABASE
    if not force and current.is_file() and current.stat().st_size > 0:
        try:
            intact = probe_database(current).schema_version is not None
        except StoreError:
            intact = False
        if intact:
            raise ConflictError(
                f"{current} is intact; restoring would replace it",
                hint="pass --force to replace it (it is kept, renamed, beside the new one)",
            )
    store_id = info.store_id or _marker_id(state_dir) or new_store_id()
    temp = state_dir / f".{DATABASE}.restoring"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copy, temp)
        if info.store_id is None:  # a database from before store ids: give it this folder's
            _set_store_id(temp, store_id)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        replaced = set_aside_database(state_dir)
        os.replace(temp, current)
        _fsync_dir(state_dir)
    except (OSError, sqlite3.Error) as exc:
        temp.unlink(missing_ok=True)
        raise StoreError(f"cannot restore into {state_dir}: {exc}") from exc
    write_marker(state_dir, store_id=store_id, schema_version=found)
    return RestoreReport(
        path=current,
        store_id=store_id,
        schema_version=found,
        blobs=len(manifest["blobs"]),
        replaced=replaced,
    )
