"""The store's schema version, its creation and the migrations from older versions."""

from __future__ import annotations

from sqlalchemy import (
    Connection,
    Table,
    inspect,
    text,
    update,
)
from sqlalchemy.schema import CreateColumn
from sqlmodel import Session, col, select

from flctl.core.errors import (
    SchemaMismatchError,
)
from flctl.store import (
    _ledger,  # noqa: F401  (registers its table before create_all)
    _revocations,  # noqa: F401  (registers its table before create_all)
)
from flctl.store._rows import dump_config, load_dict
from flctl.store._state import (
    new_store_id,
)
from flctl.store._tables import (
    EventRow,
    MetaRow,
    ModelRow,
    RoundRow,
    TableBase,
    UpdateRow,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "check_schema", "init_schema", "migrate"]

#: 1: models, refs, rounds, updates, clients, events. 2: the registry (tags; model status,
#: reason, author, source, config). 3: rounds.tasks. 4: dp_ledger.unclipped_fraction and
#: next_clip_norm (adaptive clipping). 5: pending_rollbacks (rollbacks deferred behind a
#: running round survive a restart). 6: models.state_digest (the strategy's state with each
#: version) and rounds.fit_config (the strategy's per-client fit config). 7: updates.scores,
#: outlier and excluded (Byzantine detection). 8: leadership, leaders, coordinators and
#: events.epoch (standby coordinators on a shared database). 9: events indexed by (type, seq)
#: and (server_round, type) (a page of one type, some types of some rounds, without scanning
#: the log). Older databases are migrated when opened.
SCHEMA_VERSION = 9
SCHEMA_KEY = "schema_version"
STORE_ID_KEY = "store_id"


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
        config_json, config_hash = dump_config(load_dict(config))
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


def _migrate_7_to_8(session: Session) -> None:
    """Add events.epoch; ``create_all`` adds the leadership tables afterwards."""
    _add_missing_columns(session.connection(), TableBase.metadata.tables[EventRow.__tablename__])


def _migrate_8_to_9(session: Session) -> None:
    """Index events by (type, seq) and (server_round, type): pages and rounds from indexes."""
    for index in TableBase.metadata.tables[EventRow.__tablename__].indexes:
        index.create(session.connection(), checkfirst=True)


#: schema version found -> the step that brings it to the next version.
MIGRATIONS = {
    "1": _migrate_1_to_2,
    "2": _migrate_2_to_3,
    "3": _migrate_3_to_4,
    "4": _migrate_4_to_5,
    "5": _migrate_5_to_6,
    "6": _migrate_6_to_7,
    "7": _migrate_7_to_8,
    "8": _migrate_8_to_9,
}


def migrate(session: Session, found: int, target: int) -> None:
    for version in range(found, target):
        MIGRATIONS[str(version)](session)


def init_schema(session: Session) -> int | None:
    """Create the schema, or migrate an older one, in the caller's write transaction.

    Returns:
        The schema version the database had (None: it had no schema; now it has).

    Raises:
        SchemaMismatchError: The database has another (newer, or unknown) schema version, or
            flctl tables without a version.
    """
    existing = set(inspect(session.connection()).get_table_names())
    found: str | None = None
    if "meta" in existing:
        row = session.get(MetaRow, SCHEMA_KEY)
        found = row.value if row is not None else None
        if row is not None and found in MIGRATIONS:
            # An older database: bring it up to date in this same transaction.
            migrate(session, int(row.value), SCHEMA_VERSION)
            row.value = str(SCHEMA_VERSION)
            session.add(row)
        elif found != str(SCHEMA_VERSION):
            raise SchemaMismatchError(
                f"state database has schema version {found}, this flctl uses {SCHEMA_VERSION}",
                hint="use the flctl version that wrote it, or a fresh state folder",
                details={"found": found, "expected": SCHEMA_VERSION},
            )
    elif existing & set(TableBase.metadata.tables):
        raise SchemaMismatchError(
            "state database has flctl tables but no schema version",
            details={"found": None, "expected": SCHEMA_VERSION},
        )
    TableBase.metadata.create_all(session.connection())
    if "meta" not in existing:
        session.add(MetaRow(key=SCHEMA_KEY, value=str(SCHEMA_VERSION)))
    if session.get(MetaRow, STORE_ID_KEY) is None:
        session.add(MetaRow(key=STORE_ID_KEY, value=new_store_id()))
    return None if found is None else int(found)


def check_schema(session: Session) -> None:
    """A read-only store must already have this flctl's schema: it cannot migrate.

    Raises:
        SchemaMismatchError: The schema is not the current one.
    """
    row = session.get(MetaRow, SCHEMA_KEY)
    found = None if row is None else row.value
    if found == str(SCHEMA_VERSION):
        return
    raise SchemaMismatchError(
        f"state database has schema version {found}, this flctl uses {SCHEMA_VERSION}",
        hint="start `flctl serve` once: it backs the database up, then migrates it"
        if found in MIGRATIONS
        else "use the flctl version that wrote it",
        details={"found": found, "expected": SCHEMA_VERSION},
    )
