"""Revoked identities and certificates, in the state database's ``revocations`` table.

A revocation names an identity and, optionally, one certificate serial of it; without a serial
it covers every certificate of that identity, past and future. Revocations are never deleted.
Each one is written with an ``identity.revoked`` event in the same transaction, so the event
log shows it with its author: ``local`` (``flctl certs revoke`` with no coordinator running) or
the admin identity that asked a running coordinator.

Serials have up to 159 bits, more than an SQL ``BIGINT``: the table keeps them as lower-case
hex text; the functions take and return ``int``.

The table is defined on the store's own table base, and :mod:`flctl.store._schema` imports this
module, so ``SqlStore`` creates it with the others (``CREATE TABLE IF NOT EXISTS``: databases
written before it existed get it when next opened).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Text, or_
from sqlmodel import Field, col, select

from flctl.core.errors import InvalidInputError
from flctl.core.events import IDENTITY_REVOKED
from flctl.store._tables import EventRow, TableBase

if TYPE_CHECKING:
    from flctl.store._sql import SqlStore

__all__ = [
    "LOCAL_AUTHOR",
    "RevocationRecord",
    "RevocationRow",
    "is_revoked",
    "list_revocations",
    "revoke",
    "revoked_identities",
]

LOCAL_AUTHOR = "local"
"""The author of a revocation written without a coordinator (``flctl certs revoke`` offline)."""

_MAX_NAME = 255
_MAX_REASON = 1024
_MAX_SERIAL = 1 << 160


class RevocationRow(TableBase, table=True):
    """One revocation (identity-wide when ``serial`` is NULL)."""

    __tablename__ = "revocations"

    id: int | None = Field(default=None, primary_key=True)
    identity: str = Field(max_length=_MAX_NAME, index=True)
    serial: str | None = Field(default=None, max_length=40)
    reason: str = Field(default="", sa_type=Text)
    revoked_at: float
    author: str = Field(max_length=_MAX_NAME)


@dataclass(frozen=True)
class RevocationRecord:
    """One revocation.

    Attributes:
        id: Its row id, from 1.
        identity: The revoked identity (a certificate's subject CN).
        serial: The one certificate revoked, or None for every certificate of ``identity``.
        reason: Why, in the operator's words ("" if none was given).
        revoked_at: Unix time it was recorded.
        author: ``local`` or the admin identity that revoked it.
        event_seq: The ``identity.revoked`` event :func:`revoke` wrote with it; 0 when it wrote
            none, and in listings.
    """

    id: int
    identity: str
    serial: int | None
    reason: str
    revoked_at: float
    author: str
    event_seq: int = 0

    @property
    def covers_all(self) -> bool:
        """Whether it revokes every certificate of the identity."""
        return self.serial is None


def revoke(
    store: SqlStore,
    identity: str,
    *,
    serial: int | None = None,
    reason: str = "",
    author: str = LOCAL_AUTHOR,
    record_event: bool = True,
) -> RevocationRecord:
    """Record a revocation, with its ``identity.revoked`` event, in one transaction.

    Revoking what is already revoked records the request again (the audit trail keeps every
    one); it changes nothing else.

    Args:
        store: The state store.
        identity: The identity to revoke (1-255 characters).
        serial: One certificate's serial, or None for all of the identity's certificates.
        reason: Why (at most 1024 characters).
        author: ``local`` or the admin identity asking (1-255 characters).
        record_event: Also append the event; a running coordinator passes False and emits it
            through its own event log, which wakes followers.

    Returns:
        The new record.

    Raises:
        InvalidInputError: An empty or too long identity or author, a too long reason, or a
            serial that is not a positive integer below 2**160.
    """
    _check_text("identity", identity, 1, _MAX_NAME)
    _check_text("author", author, 1, _MAX_NAME)
    _check_text("reason", reason, 0, _MAX_REASON)
    if serial is not None and (
        isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < _MAX_SERIAL
    ):
        raise InvalidInputError(f"serial must be a positive integer below 2**160, got {serial!r}")
    now = time.time()
    row = RevocationRow(
        identity=identity,
        serial=None if serial is None else format(serial, "x"),
        reason=reason,
        revoked_at=now,
        author=author,
    )
    event = None
    if record_event:
        event = EventRow(
            time=now,
            type=IDENTITY_REVOKED,
            client_id=identity,
            data=json.dumps(
                {"serial": row.serial, "reason": reason, "author": author}, sort_keys=True
            ),
        )
    with store.session(write=True) as session:
        session.add(row)
        if event is not None:
            session.add(event)
        session.flush()
        record = _record(row, (event.seq or 0) if event is not None else 0)
        store.commit(session)
    return record


def list_revocations(store: SqlStore, identity: str | None = None) -> list[RevocationRecord]:
    """Return every revocation (or one identity's), oldest first."""
    stmt = select(RevocationRow).order_by(col(RevocationRow.id))
    if identity is not None:
        stmt = stmt.where(RevocationRow.identity == identity)
    with store.session() as session:
        return [_record(row) for row in session.exec(stmt)]


def revoked_identities(store: SqlStore) -> set[str]:
    """Return the identities revoked as a whole (every certificate of theirs)."""
    stmt = select(RevocationRow.identity).where(col(RevocationRow.serial).is_(None)).distinct()
    with store.session() as session:
        return set(session.exec(stmt))


def is_revoked(store: SqlStore, identity: str, serial: int | None = None) -> bool:
    """Whether ``identity`` is revoked as a whole, or its certificate ``serial`` is.

    Args:
        store: The state store.
        identity: The certificate's subject CN.
        serial: The certificate's serial; None asks only about identity-wide revocation.
    """
    everything = col(RevocationRow.serial).is_(None)
    match = (
        everything
        if serial is None
        else or_(everything, col(RevocationRow.serial) == format(serial, "x"))
    )
    stmt = select(RevocationRow.id).where(RevocationRow.identity == identity, match).limit(1)
    with store.session() as session:
        return session.exec(stmt).first() is not None


def _check_text(label: str, value: str, low: int, high: int) -> None:
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise InvalidInputError(
            f"{label} must be a string of {low}-{high} characters: {value!r:.80}"
        )


def _record(row: RevocationRow, event_seq: int = 0) -> RevocationRecord:
    if row.id is None:  # pragma: no cover - flush always assigns the primary key
        raise InvalidInputError("the database did not assign a revocation id")
    return RevocationRecord(
        id=row.id,
        identity=row.identity,
        serial=None if row.serial is None else int(row.serial, 16),
        reason=row.reason,
        revoked_at=row.revoked_at,
        author=row.author,
        event_seq=event_seq,
    )
