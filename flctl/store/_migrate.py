"""Move a project's SQLite store into a shared database (``flctl store migrate --from``).

Every table is copied row for row in one transaction of the target: all of it lands, or
nothing does. Rows the target already holds with the same values are skipped, so running the
migration again changes nothing; a row the target holds with other values is a conflict and
nothing is written. The blobs the rows reference are copied into the target's blob folder
(each re-hashed on the way). Afterwards every table is compared row by row, and every
referenced blob is hashed against its digest.

The leadership tables are not copied (they describe the coordinators of the target), and a
migration is refused while a coordinator leads the target.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Table, func, insert, select, text
from sqlmodel import Session

from flctl.core.errors import ConflictError, IntegrityError, NotFoundError, StoreError
from flctl.store._backup import backup_database
from flctl.store._blobs import BlobStore, sha256_file
from flctl.store._leadership import LOCK_KEY
from flctl.store._schema import SCHEMA_KEY, STORE_ID_KEY
from flctl.store._sql import SqlStore
from flctl.store._tables import TableBase

__all__ = ["MigrationReport", "migrate_store"]

#: Runtime state of the coordinators sharing a store: never copied.
_SKIPPED = ("leadership", "leaders", "coordinators")
_BATCH = 1000


@dataclass
class MigrationReport:
    """What :func:`migrate_store` did."""

    source: str
    target: str
    store_id: str
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    blobs_copied: int = 0
    blobs_verified: int = 0
    seconds: float = 0.0

    @property
    def rows_copied(self) -> int:
        return sum(t["copied"] for t in self.tables.values())


def _tables() -> list[Table]:
    return [t for t in TableBase.metadata.sorted_tables if t.name not in _SKIPPED]


def _key(table: Table, row: Any) -> tuple[Any, ...]:
    return tuple(row._mapping[c.name] for c in table.primary_key.columns)


def _rows(session: Session, table: Table) -> list[Any]:
    order = list(table.primary_key.columns)
    return list(session.connection().execute(select(table).order_by(*order)))


def migrate_store(
    source_db: Path, source_blobs: Path, target: SqlStore, blobs: BlobStore
) -> MigrationReport:
    """Copy the SQLite store ``source_db`` (with its blobs) into ``target``; verify the copy.

    Raises:
        NotFoundError: ``source_db`` does not exist.
        ConflictError: The target holds other data under the same keys, or a coordinator
            leads it now.
        IntegrityError: A referenced blob is missing or does not hash to its digest.
    """
    started = time.monotonic()
    if not source_db.is_file():
        raise NotFoundError(f"no SQLite store at {source_db}")
    scratch = blobs.tmp_dir / f"migrate-{time.time_ns()}.db"
    # a consistent snapshot (a coordinator may still run on it), brought to this schema
    backup_database(source_db, scratch)
    try:
        source = SqlStore(f"sqlite:///{scratch}")
        try:
            # blobs first (content-addressed: copying one twice changes nothing), so that
            # the rows land only once everything they reference is in place
            _check(source, target, str(source_db))
            copied, verified = _copy_blobs(source.referenced_digests(), source_blobs, blobs)
            report = _copy(source, target, str(source_db))
        finally:
            source.close()
    finally:
        scratch.unlink(missing_ok=True)
    report.blobs_copied, report.blobs_verified = copied, verified
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _copy_blobs(digests: set[str], source: Path, blobs: BlobStore) -> tuple[int, int]:
    """Copy each referenced blob missing from ``blobs``; hash every one: (copied, verified)."""
    missing = [d for d in sorted(digests) if not blobs.has(d) and not (_in(source, d)).is_file()]
    if missing:
        raise IntegrityError(
            f"{len(missing)} blob(s) the store references are in neither blob folder "
            f"(e.g. {missing[0][:12]}): nothing was copied",
            hint="`flctl models verify` in the SQLite project lists them",
            details={"missing": missing[:20]},
        )
    copied = 0
    for digest in sorted(digests):
        if not blobs.has(digest):
            temp, handle = blobs.temp_file()
            with handle, _in(source, digest).open("rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)
            if sha256_file(temp) != digest:
                temp.unlink(missing_ok=True)
                raise IntegrityError(f"{_in(source, digest)} does not hash to its name")
            blobs.commit_temp(temp, digest)
            copied += 1
        if sha256_file(blobs.path(digest)) != digest:
            raise IntegrityError(f"blob {digest[:12]} in {blobs.root} does not hash to its digest")
    return copied, len(digests)


def _in(folder: Path, digest: str) -> Path:
    return BlobStore.object_path(folder, digest)


def _plan(read: Session, write: Session, where: str) -> dict[Table, tuple[list[Any], int]]:
    """Per table: the source rows the target lacks, and how many it holds already.

    Raises:
        ConflictError: The target holds other values under a source row's key.
    """
    plan = {}
    for table in _tables():
        have = {_key(table, row): tuple(row) for row in _rows(write, table)}
        missing = []
        skipped = 0
        for row in _rows(read, table):
            key = _key(table, row)
            if table.name == "meta" and key[0] in (SCHEMA_KEY, STORE_ID_KEY):
                continue  # the target's own schema; the store id is set apart
            mine = have.get(key)
            if mine is None:
                missing.append(dict(row._mapping))
            elif mine == tuple(row):
                skipped += 1
            else:
                raise ConflictError(
                    f"the target store holds other data in {table.name} {key!r} than "
                    f"{where}: nothing was copied",
                    hint="migrate into an empty database, or into the one migrated before",
                )
        plan[table] = (missing, skipped)
    return plan


def _check(source: SqlStore, target: SqlStore, where: str) -> None:
    """Refuse a conflicting target before anything (blobs included) is written."""
    with source.session() as read, target.session() as write:
        _plan(read, write, where)


def _copy(source: SqlStore, target: SqlStore, where: str) -> MigrationReport:
    store_id = source.store_id
    report = MigrationReport(source=where, target=repr(target), store_id=store_id)
    with source.session() as read, target.session(write=True) as write:
        if target.dialect == "postgresql":
            taken = (
                write.connection()
                .execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
                .scalar()
            )
            if not taken:
                raise ConflictError(
                    "a coordinator leads the target store now: migrate before serving it",
                    hint="stop the coordinators on that database, then migrate",
                )
        for table, (missing, skipped) in _plan(read, write, where).items():
            for start in range(0, len(missing), _BATCH):
                write.connection().execute(insert(table), missing[start : start + _BATCH])
            report.tables[table.name] = {"copied": len(missing), "skipped": skipped}
        write.connection().execute(
            text("UPDATE meta SET value = :id WHERE key = :key"),
            {"id": store_id, "key": STORE_ID_KEY},
        )
        if target.dialect == "postgresql":
            _reset_sequences(write)
        _verify(read, write)
        target.commit(write)
    return report


def _reset_sequences(session: Session) -> None:
    """Point each serial column's sequence past the ids copied in (PostgreSQL)."""
    for table in _tables():
        for column in table.primary_key.columns:
            if column.autoincrement is not True and not (
                column.autoincrement == "auto" and column.type.python_type is int
            ):
                continue
            sequence = (
                session.connection()
                .execute(
                    text("SELECT pg_get_serial_sequence(:table, :column)"),
                    {"table": table.name, "column": column.name},
                )
                .scalar()
            )
            if sequence is None:
                continue
            last = session.connection().execute(select(func.max(column))).scalar()
            if last is not None:
                session.connection().execute(
                    text("SELECT setval(:sequence, :value)"), {"sequence": sequence, "value": last}
                )


def _verify(source: Session, target: Session) -> None:
    """Every copied table holds the same rows on both sides (the meta keys of each aside)."""
    for table in _tables():
        a = _digest(table, _rows(source, table))
        b = _digest(table, _rows(target, table))
        if a != b:
            raise StoreError(
                f"the copy of {table.name} differs from the source after migrating: rolled back"
            )


def _digest(table: Table, rows: list[Any]) -> str:
    sha = hashlib.sha256()
    for row in rows:
        if table.name == "meta" and _key(table, row)[0] in (SCHEMA_KEY, STORE_ID_KEY):
            continue
        sha.update(repr(tuple(row)).encode())
    return sha.hexdigest()
