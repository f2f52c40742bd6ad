"""Row helpers shared by the store's modules: checks, JSON columns, records from rows, lookups.

Every function here works inside a caller's ``Session``; none opens a transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    func,
    update,
)
from sqlmodel import Session, col, select

from flctl.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    StoreError,
)
from flctl.core.events import Event
from flctl.store._records import (
    ROUND_STATUSES,
    TERMINAL,
    ClientRecord,
    ModelRecord,
    PendingRollbackRecord,
    RoundRecord,
    TagRecord,
    UpdateRecord,
)
from flctl.store._tables import (
    ClientRow,
    EventRow,
    ModelRow,
    PendingRollbackRow,
    RefRow,
    RoundRow,
    TagRow,
    UpdateRow,
)

__all__ = [
    "CLIENTS",
    "DIGEST_PREFIX_RE",
    "EVENTS",
    "HEAD",
    "IN_PROGRESS",
    "MIN_PREFIX",
    "SHORT_HEX_RE",
    "TAG_RE",
    "check_choice",
    "check_limit",
    "check_tag_name",
    "client_record",
    "dump_config",
    "dump_json",
    "dump_metrics",
    "dump_scores",
    "event_record",
    "get_model_row",
    "get_round_row",
    "guarded_round_update",
    "insert_model",
    "load_dict",
    "load_scores",
    "model_record",
    "pending_record",
    "round_record",
    "row_id",
    "set_ref",
    "tag_record",
    "update_record",
]

HEAD = "head"
EVENTS = EventRow.__table__  # type: ignore[attr-defined]
CLIENTS = ClientRow.__table__  # type: ignore[attr-defined]
IN_PROGRESS = tuple(s for s in ROUND_STATUSES if s != "queued" and s not in TERMINAL)
DIGEST_PREFIX_RE = re.compile(r"[0-9a-f]{6,64}")
SHORT_HEX_RE = re.compile(r"[0-9a-f]{1,5}")
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
MIN_PREFIX = 6


def check_choice(what: str, value: str, allowed: Any) -> None:
    if value not in allowed:
        raise InvalidInputError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def check_tag_name(name: str) -> None:
    if not isinstance(name, str) or TAG_RE.fullmatch(name) is None:
        raise InvalidInputError(
            f"invalid tag name {name!r}: a letter, then up to 63 letters, digits, '.', '_' or '-'"
        )
    if name == HEAD:
        raise InvalidInputError("'head' is reserved: it always names the head model")
    if DIGEST_PREFIX_RE.fullmatch(name):
        raise InvalidInputError(
            f"tag name {name!r} reads as a digest prefix; add a letter outside a-f"
        )


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidInputError(f"limit must be a non-negative integer, got {limit!r}")
    return limit


def dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not JSON-serialisable: {exc}") from exc


def dump_metrics(metrics: Mapping[str, float] | None) -> str:
    try:
        clean = {str(k): float(v) for k, v in (metrics or {}).items()}
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metrics must map names to numbers: {exc}") from exc
    return json.dumps(clean, sort_keys=True)


def dump_scores(scores: Mapping[str, float | None]) -> str:
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


def load_scores(text: str | None) -> dict[str, float | None] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def dump_config(config: Mapping[str, Any] | None) -> tuple[str, str]:
    """Return a config's canonical JSON and its SHA-256 ("" for an empty config)."""
    if not config:
        return "{}", ""
    canonical = dump_json(dict(config), "model config")
    return canonical, hashlib.sha256(canonical.encode()).hexdigest()


def load_dict(text: str) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def row_id(value: int | None) -> int:
    if value is None:  # pragma: no cover - flush always assigns the primary key
        raise StoreError("the database did not assign an id")
    return value


def insert_model(
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


def set_ref(session: Session, name: str, version: int) -> None:
    ref = session.get(RefRow, name)
    if ref is None:
        session.add(RefRow(name=name, version=version))
    else:
        ref.version = version
    session.flush()


def get_model_row(session: Session, version: int) -> ModelRow:
    row = session.get(ModelRow, version)
    if row is None:
        raise NotFoundError(f"model version {version} not found")
    return row


def get_round_row(session: Session, round_id: int) -> RoundRow:
    row = session.get(RoundRow, round_id)
    if row is None:
        raise NotFoundError(f"round {round_id} not found")
    return row


def guarded_round_update(session: Session, round_id: int, values: dict[str, Any]) -> None:
    """Update a round only while it is not terminal (checked and written in one statement)."""
    result = session.exec(
        update(RoundRow)
        .where(col(RoundRow.id) == round_id, col(RoundRow.status).not_in(TERMINAL))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:
        row = get_round_row(session, round_id)
        raise ConflictError(
            f"round {round_id} is already {row.status}",
            details={"round": round_id, "status": row.status},
        )


def model_record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        version=row.version,
        digest=row.digest,
        parent=row.parent,
        server_round=row.server_round,
        kind=row.kind,
        metrics=load_dict(row.metrics),
        created=row.created,
        status=row.status,
        reason=row.reason,
        author=row.author,
        source=row.source,
        config=load_dict(row.config_json),
        config_hash=row.config_hash,
        state_digest=row.state_digest or "",
    )


def tag_record(row: TagRow) -> TagRecord:
    return TagRecord(name=row.name, version=row.version, author=row.author, created=row.created)


def round_record(row: RoundRow) -> RoundRecord:
    selected = json.loads(row.selected) if row.selected else []
    return RoundRecord(
        id=row_id(row.id),
        status=row.status,
        created=row.created,
        started=row.started,
        ended=row.ended,
        base_version=row.base_version,
        model_version=row.model_version,
        num_clients=row.num_clients,
        selected=[str(c) for c in selected],
        metrics=load_dict(row.metrics),
        reason=row.reason,
        deadline=row.deadline,
        config=load_dict(row.config),
        tasks={str(k): str(v) for k, v in load_dict(row.tasks or "{}").items()},
        fit_config={
            str(k): dict(v)
            for k, v in load_dict(row.fit_config or "{}").items()
            if isinstance(v, dict)
        },
    )


def pending_record(row: PendingRollbackRow) -> PendingRollbackRecord:
    return PendingRollbackRecord(
        id=row_id(row.id),
        source=row.source,
        author=row.author,
        reason=row.reason,
        server_round=row.server_round,
        created=row.created,
    )


def update_record(row: UpdateRow) -> UpdateRecord:
    return UpdateRecord(
        id=row_id(row.id),
        server_round=row.server_round,
        client_id=row.client_id,
        task_id=row.task_id,
        status=row.status,
        reason=row.reason,
        digest=row.digest,
        size=row.size,
        num_examples=row.num_examples,
        metrics=load_dict(row.metrics),
        created=row.created,
        scores=load_scores(row.scores),
        outlier=row.outlier or "",
        is_excluded=bool(row.excluded),
    )


def client_record(row: ClientRow) -> ClientRecord:
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


def event_record(row: EventRow) -> Event:
    return Event(
        seq=row_id(row.seq),
        time=row.time,
        type=row.type,
        server_round=row.server_round,
        client_id=row.client_id,
        data=load_dict(row.data),
    )
