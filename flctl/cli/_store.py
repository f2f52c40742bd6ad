"""``flctl store``: back up the state store, and restore it after a loss.

A backup is a folder: ``state.db``, a consistent copy taken with SQLite's online backup (so a
running coordinator need not stop), and ``manifest.json``, which lists every blob the copy
references with its size. Restoring checks the manifest against the blob folder before it puts
the database in place, and refuses while a coordinator runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flctl.cli._options import ConfigOpt, JsonOpt
from flctl.cli._output import Output, command
from flctl.core.config import Config
from flctl.core.errors import ConfigError

__all__ = ["store_app"]

store_app = typer.Typer(
    help="Create, migrate, back up and restore the state store.",
    no_args_is_help=True,
)

BackupPathArg = Annotated[
    Path,
    typer.Argument(
        metavar="PATH", help="The backup folder (`backup`: a new or empty one).", show_default=False
    ),
]


def _sqlite_only(config: Config, command: str) -> None:
    """Backups and restores copy the SQLite file; a PostgreSQL store has its own tools."""
    if config.store_url:
        from flctl.store import store_location

        raise ConfigError(
            f"`flctl store {command}` copies the SQLite state file; this project keeps its "
            f"state in {store_location(config)}",
            hint="back PostgreSQL up with pg_dump (and the blob folder with your file backups): "
            "docs/deployment.md",
        )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@store_app.command("init")
@command()
def store_init(config_path: ConfigOpt = None, json_output: JsonOpt = False) -> None:
    """Create the state store's schema, or migrate an older one.

    `flctl serve` does it too when it starts.

    The store is where [store] url says (default: the SQLite file in the state folder). An
    older SQLite file is backed up first. A schema newer than this flctl's is refused.
    """
    from flctl.cli._common import load_project, lock_or_running
    from flctl.store import SqlStore, open_store, store_location

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    where = store_location(config)
    if config.store_url:
        store = open_store(config)
    else:
        with lock_or_running(config.state_path, "store init") as running:
            # a running coordinator opened (and so created or migrated) the store itself
            store = open_store(config, read_only=running is not None)
    try:
        found = store.migrated_from if store.migrated_from is not None else store.schema_found
        store_id = store.store_id
    finally:
        store.close()
    if store.is_read_only or found == SqlStore.SCHEMA_VERSION:
        action = "current"  # (read-only: the running coordinator opened it, and so migrated it)
    else:
        action = "created" if found is None else "migrated"
    doc = {
        "store": where,
        "backend": "postgresql" if config.store_url else "sqlite",
        "store_id": store_id,
        "schema_version": SqlStore.SCHEMA_VERSION,
        "action": action,
        "migrated_from": found if action == "migrated" else None,
        "backup": None if store.backup_path is None else str(store.backup_path),
    }
    if json_output:
        out.json(doc)
        return
    what = {
        "created": "created the schema",
        "current": "the schema is current",
        "migrated": f"migrated the schema from version {found}",
    }[action]
    out.line(f"{where}: {what} (version {SqlStore.SCHEMA_VERSION}, store {store_id})")
    if store.backup_path is not None:
        out.line(f"  the database as it was is backed up in {store.backup_path}")


@store_app.command("migrate")
@command()
def store_migrate(
    source: Annotated[
        Path,
        typer.Option(
            "--from",
            metavar="PATH",
            help="The SQLite state file to copy (e.g. .flctl/state.db).",
            show_default=False,
        ),
    ],
    blobs_from: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH", help="Its blob folder (default: blobs/ beside the state file)."
        ),
    ] = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Copy a SQLite store into the shared database, and verify it.

    The database is the one [store] url (or FLCTL_STORE_URL) names.

    Rows and blobs are copied, then every table is compared row by row and every referenced
    blob hashed. Running it again copies nothing more. Refused while a coordinator leads the
    target.
    """
    from flctl.cli._common import load_project
    from flctl.store import BlobStore, migrate_store, open_store, store_location

    config = load_project(config_path)
    if not config.store_url:
        raise ConfigError(
            "`flctl store migrate` copies into the database [store] url names; this project "
            "has none",
            hint="set [store] url (or FLCTL_STORE_URL) to the PostgreSQL database first",
        )
    source = source.resolve()
    blobs_dir = (blobs_from or source.parent / "blobs").resolve()
    out = Output(json_mode=json_output)
    if not json_output:
        out.line(f"copying {source} (blobs {blobs_dir}) into {store_location(config)} ...")
    target = open_store(config)
    try:
        report = migrate_store(source, blobs_dir, target, BlobStore(config.blobs_path))
    finally:
        target.close()
    doc = {
        "source": str(source),
        "target": store_location(config),
        "store_id": report.store_id,
        "rows_copied": report.rows_copied,
        "tables": report.tables,
        "blobs_copied": report.blobs_copied,
        "blobs_verified": report.blobs_verified,
        "seconds": report.seconds,
    }
    if json_output:
        out.json(doc)
        return
    skipped = sum(t["skipped"] for t in report.tables.values())
    out.line(
        f"copied {report.rows_copied} rows ({skipped} already there) and "
        f"{report.blobs_copied} blobs in {report.seconds:g} s; verified every table row by row "
        f"and {report.blobs_verified} blobs by their sha256"
    )


@store_app.command("backup")
@command()
def store_backup(
    path: BackupPathArg, config_path: ConfigOpt = None, json_output: JsonOpt = False
) -> None:
    """Back up the state database and a manifest of its blobs.

    Safe while the coordinator runs (SQLite's online backup). Blobs are not copied: keep the
    blob folder backed up with your file backups; `store restore` checks it against the manifest.
    """
    from flctl.cli._common import load_project
    from flctl.store import write_backup

    config = load_project(config_path)
    _sqlite_only(config, "backup")
    report = write_backup(config.state_path, path)
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "path": str(report.path.resolve()),
                "store_id": report.store_id,
                "schema_version": report.schema_version,
                "database_bytes": report.database_bytes,
                "blobs": report.blobs,
                "blob_bytes": report.blob_bytes,
                "missing_blobs": report.missing,
            }
        )
        return
    out.line(
        f"backed up the state database ({_size(report.database_bytes)}, schema "
        f"{report.schema_version}) and a manifest of {report.blobs} blobs "
        f"({_size(report.blob_bytes)}) to {report.path}"
    )
    if report.missing:
        out.note(
            f"{len(report.missing)} blob(s) the database references were already missing "
            "(`flctl models verify` lists them); the backup records them as missing"
        )


@store_app.command("restore")
@command()
def store_restore(
    path: BackupPathArg,
    force: Annotated[
        bool,
        typer.Option(help="Replace a database that is intact (it is kept, renamed)."),
    ] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Restore the state database from a backup, blobs checked first.

    Every blob the backup references must be in the blob folder with its sha256. Refused while
    a coordinator runs. Nothing is deleted: the database it replaces is renamed to
    state.db.replaced-TIME.
    """
    from flctl.cli._common import load_project, lock_or_running, refuse_running
    from flctl.store import SqlStore, restore_backup

    config = load_project(config_path)
    _sqlite_only(config, "restore")
    with lock_or_running(config.state_path, "store restore") as running:
        if running is not None:
            raise refuse_running(
                running,
                "a store is restored only while none runs",
                "stop the coordinator, then restore",
            )
        report = restore_backup(
            config.state_path, path, schema_version=SqlStore.SCHEMA_VERSION, force=force
        )
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "path": str(report.path),
                "store_id": report.store_id,
                "schema_version": report.schema_version,
                "blobs_verified": report.blobs,
                "replaced": None if report.replaced is None else str(report.replaced),
            }
        )
        return
    out.line(
        f"restored {report.path} from {path} (schema {report.schema_version}); "
        f"{report.blobs} blobs verified"
    )
    if report.replaced is not None:
        out.line(f"the database it replaced is kept as {report.replaced}")
