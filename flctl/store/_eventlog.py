"""The append-only event log."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    func,
    insert,
)
from sqlmodel import col, select

from flctl.core.events import ADMIN_EVENT_TYPES, EVENT_TYPES, Event
from flctl.store._database import Database
from flctl.store._rows import (
    EVENTS,
    check_limit,
    dump_json,
    event_record,
    row_id,
)
from flctl.store._tables import (
    EventRow,
)

__all__ = ["EventLog"]


class EventLog(Database):
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
                disk (see :meth:`Database.session`); inside :meth:`transaction` the
                transaction decides.

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
            "data": dump_json(data_dict, "event data"),
            "epoch": self.epoch,
        }
        with self.session(write=True, durable=durable) as session:
            # Core INSERT: the ORM's unit of work costs more than the insert itself here
            statement = insert(EVENTS).values(**values)
            if self.dialect == "postgresql":
                # A PostgreSQL sequence keeps the numbers a rolled-back transaction drew, and
                # seqs are gap-free: the next one is taken inside the transaction instead.
                following = select(func.coalesce(func.max(EVENTS.c.seq), 0) + 1)
                statement = statement.values(seq=following.scalar_subquery())
            result = session.connection().execute(statement.returning(EVENTS.c.seq))
            seq = result.scalar_one()
            event_ = Event(
                seq=row_id(seq),
                time=now,
                type=type,
                server_round=server_round,
                client_id=client_id,
                data=data_dict,
            )
            self._unpublished.append(event_)
            self.commit(session)
        return event_

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """Return up to ``limit`` events with ``seq`` greater than the one given, ascending."""
        stmt = (
            select(EventRow)
            .where(col(EventRow.seq) > seq)
            .order_by(col(EventRow.seq))
            .limit(check_limit(limit))
        )
        with self.session() as session:
            return [event_record(row) for row in session.exec(stmt)]

    def events_page(
        self, before_seq: int = 0, limit: int = 50, type_filter: str = "", server_round: int = 0
    ) -> list[Event]:
        """One page of the log, newest first, without reading the rest of it.

        Args:
            before_seq: Only events older than this seq (0: from the newest).
            limit: At most this many.
            type_filter: A type (``round.committed``), a prefix (``round``: ``round.*``),
                ``admin`` (:data:`~flctl.core.events.ADMIN_EVENT_TYPES`), or "" for all.
            server_round: Only this round's events (0: any round's).
        """
        check_limit(limit)
        if type_filter == "admin":
            types = sorted(ADMIN_EVENT_TYPES)
        elif type_filter:
            prefix = type_filter + "."
            types = sorted({type_filter} | {t for t in EVENT_TYPES if t.startswith(prefix)})
        else:
            types = [""]
        found: list[EventRow] = []
        with self.session() as session:
            # one indexed read per type (index (type, seq)), merged: a rare type is as quick
            # to page through as a common one, however long the log
            for kind in types:
                stmt = select(EventRow).order_by(col(EventRow.seq).desc()).limit(limit)
                if kind:
                    stmt = stmt.where(col(EventRow.type) == kind)
                if before_seq > 0:
                    stmt = stmt.where(col(EventRow.seq) < before_seq)
                if server_round > 0:
                    stmt = stmt.where(col(EventRow.server_round) == server_round)
                found.extend(session.exec(stmt))
        found.sort(key=lambda row: row.seq or 0, reverse=True)
        return [event_record(row) for row in found[:limit]]

    def round_events(
        self, round_ids: Sequence[int], types: Collection[str] | None = None
    ) -> dict[int, list[Event]]:
        """The events of these rounds (only of ``types``, when given), oldest first, by round.

        Read through the events' round index: the cost grows with these rounds' events, not
        with the log.
        """
        if not round_ids:
            return {}
        stmt = (
            select(EventRow)
            .where(col(EventRow.server_round).in_(list(round_ids)))
            .order_by(col(EventRow.seq))
        )
        if types is not None:
            stmt = stmt.where(col(EventRow.type).in_(sorted(types)))
        out: dict[int, list[Event]] = {}
        with self.session() as session:
            for row in session.exec(stmt):
                out.setdefault(row.server_round, []).append(event_record(row))
        return out

    def last_event_seq(self) -> int:
        """Return the ``seq`` of the newest event, or 0 when the log is empty."""
        with self.session() as session:
            last = session.exec(select(func.max(EventRow.seq))).one()
        return int(last or 0)
