"""SQLModel tables of the state database, on flctl's own registry and ``MetaData``.

Only portable column types: JSON is stored as TEXT (``json.dumps``), times as floats, byte
counts as BIGINT, so the same tables work on SQLite and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, Text, false
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

__all__ = [
    "ClientRow",
    "CoordinatorRow",
    "EventRow",
    "LeaderRow",
    "LeadershipRow",
    "MetaRow",
    "ModelRow",
    "PendingRollbackRow",
    "RefRow",
    "RoundRow",
    "TableBase",
    "TagRow",
    "UpdateRow",
]


class TableBase(SQLModel, registry=registry()):
    """Base of flctl's tables: its own registry, so ``SQLModel.metadata`` is never touched."""


class MetaRow(TableBase, table=True):
    """Key/value facts about the database itself (``schema_version``)."""

    __tablename__ = "meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_type=Text)


class RefRow(TableBase, table=True):
    """Named pointers at model versions (``head``)."""

    __tablename__ = "refs"

    name: str = Field(primary_key=True, max_length=64)
    version: int = Field(foreign_key="models.version")


class ModelRow(TableBase, table=True):
    """One model version."""

    __tablename__ = "models"

    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    digest: str = Field(max_length=64, index=True)
    parent: int | None = Field(default=None, foreign_key="models.version")
    server_round: int | None = None
    kind: str = Field(max_length=16)
    metrics: str = Field(default="{}", sa_type=Text)
    created: float
    # Schema version 2 (the registry). Each new column has a server default, so that an
    # ``ALTER TABLE ... ADD COLUMN`` can add it to a version-1 database that already has rows.
    status: str = Field(default="ok", max_length=16, sa_column_kwargs={"server_default": "ok"})
    reason: str = Field(default="", sa_type=Text, sa_column_kwargs={"server_default": ""})
    author: str = Field(default="", max_length=255, sa_column_kwargs={"server_default": ""})
    source: int | None = None
    config_json: str = Field(default="{}", sa_type=Text, sa_column_kwargs={"server_default": "{}"})
    config_hash: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})
    #: The strategy's state after the round that made this version (schema 6): the digest of a
    #: safetensors blob, or "" when the strategy keeps none. A rollback copies its source's.
    state_digest: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})


class TagRow(TableBase, table=True):
    """A user's name for one model version (unique; may be moved to another version)."""

    __tablename__ = "tags"

    name: str = Field(primary_key=True, max_length=64)
    version: int = Field(foreign_key="models.version", index=True)
    author: str = Field(default="", max_length=255)
    created: float


class RoundRow(TableBase, table=True):
    """One round."""

    __tablename__ = "rounds"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(max_length=16, index=True)
    created: float
    started: float | None = None
    ended: float | None = None
    base_version: int | None = None
    model_version: int | None = None
    num_clients: int = 0
    selected: str = Field(default="[]", sa_type=Text)
    metrics: str = Field(default="{}", sa_type=Text)
    reason: str = Field(default="", sa_type=Text)
    deadline: float | None = None
    config: str = Field(default="{}", sa_type=Text)
    #: client id -> task id of the selected clients (schema 3): a restarted coordinator
    #: resumes the round with the same tasks.
    tasks: str | None = Field(default=None, sa_type=Text)
    #: client id -> the extra fit config the strategy gave it (schema 6): a resumed round
    #: sends each client the same config.
    fit_config: str | None = Field(default=None, sa_type=Text)


class UpdateRow(TableBase, table=True):
    """One update received from a client."""

    __tablename__ = "updates"
    __table_args__ = (Index("ix_updates_round_client", "server_round", "client_id"),)

    id: int | None = Field(default=None, primary_key=True)
    server_round: int
    client_id: str = Field(max_length=255)
    task_id: str = Field(max_length=255)
    status: str = Field(max_length=16)
    reason: str = Field(default="", sa_type=Text)
    digest: str = Field(default="", max_length=64)
    size: int = Field(default=0, sa_type=BigInteger)
    num_examples: int = Field(default=0, sa_type=BigInteger)
    metrics: str = Field(default="{}", sa_type=Text)
    created: float
    #: The update's anomaly scores (schema 7): JSON {score name: number or null}; NULL while
    #: it was not scored (rejected updates, updates recorded before schema 7).
    scores: str | None = Field(default=None, sa_type=Text)
    #: Why the outlier rule marked it (schema 7), or "" when it did not.
    outlier: str = Field(default="", sa_type=Text, sa_column_kwargs={"server_default": ""})
    #: Whether it was left out of the round's aggregate as an outlier (schema 7).
    excluded: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class ClientRow(TableBase, table=True):
    """One client the coordinator has seen."""

    __tablename__ = "clients"

    client_id: str = Field(primary_key=True, max_length=255)
    fingerprint: str = Field(default="", max_length=128)
    state: str = Field(default="idle", max_length=32)
    first_seen: float
    last_seen: float
    rounds_joined: int = 0
    bytes_up: int = Field(default=0, sa_type=BigInteger)
    bytes_down: int = Field(default=0, sa_type=BigInteger)


class EventRow(TableBase, table=True):
    """One entry of the event log."""

    __tablename__ = "events"
    #: Schema 9: a page of one type, newest first, from (type, seq) (the dashboard's filters);
    #: some types of some rounds (their phases, their secure aggregation) from
    #: (server_round, type), however many events each round has.
    __table_args__ = (
        Index("ix_events_type_seq", "type", "seq"),
        Index("ix_events_round_type", "server_round", "type"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    time: float
    type: str = Field(max_length=64)
    server_round: int = Field(default=0, index=True)
    client_id: str = Field(default="", max_length=255)
    data: str = Field(default="{}", sa_type=Text)
    #: The leadership epoch of the coordinator that wrote it (0: no leadership; schema 8).
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class LeadershipRow(TableBase, table=True):
    """The one row coordinators sharing a database fence their writes on (schema 8).

    ``epoch`` grows by one at each takeover; every write transaction of the leader reads it
    (``FOR SHARE``) and stops when it is no longer its own.
    """

    __tablename__ = "leadership"

    id: int = Field(default=1, primary_key=True, sa_column_kwargs={"autoincrement": False})
    epoch: int = Field(default=0)


class LeaderRow(TableBase, table=True):
    """Who led in each epoch: one row per takeover, never two in one epoch (schema 8)."""

    __tablename__ = "leaders"

    epoch: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    address: str = Field(max_length=255)
    host: str = Field(default="", max_length=255)
    pid: int = 0
    since: float
    ended: float | None = None
    end_reason: str = Field(default="", sa_type=Text)


class CoordinatorRow(TableBase, table=True):
    """The coordinators that share this database, as each last reported itself (schema 8)."""

    __tablename__ = "coordinators"

    address: str = Field(primary_key=True, max_length=255)
    role: str = Field(max_length=16)  # leader, standby, stopped
    epoch: int = 0
    host: str = Field(default="", max_length=255)
    pid: int = 0
    started: float
    seen: float


class PendingRollbackRow(TableBase, table=True):
    """A rollback asked for while a round ran, applied when that round ends (schema 5).

    Kept in the database so that a coordinator killed before the round ends still applies it
    after a restart; the row goes in the same transaction as the rollback (or its failure).
    """

    __tablename__ = "pending_rollbacks"

    id: int | None = Field(default=None, primary_key=True)
    source: int
    author: str = Field(default="", max_length=255)
    reason: str = Field(default="", sa_type=Text)
    server_round: int
    created: float
