"""The clients the coordinator knows, and their counters."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    case,
    update,
)
from sqlmodel import col, select

from flctl.core.errors import (
    InvalidInputError,
)
from flctl.store._database import Database
from flctl.store._records import (
    ClientRecord,
)
from flctl.store._rows import (
    CLIENTS,
    client_record,
)
from flctl.store._tables import (
    ClientRow,
)

__all__ = ["ClientStore"]


class ClientStore(Database):
    # -- clients ----------------------------------------------------------------------------

    def upsert_client(
        self,
        client_id: str,
        *,
        fingerprint: str | None = None,
        state: str | None = None,
        seen: float | None = None,
        add_rounds: int = 0,
        add_bytes_up: int = 0,
        add_bytes_down: int = 0,
    ) -> ClientRecord:
        """Create or update a client; the ``add_*`` counters accumulate.

        A new client gets ``first_seen = last_seen = seen`` (now if None), fingerprint "" and
        state ``idle`` unless given. On an existing client, None leaves a field unchanged
        (``seen`` included) and ``last_seen`` never moves backwards.

        Raises:
            InvalidInputError: A negative counter increment.
        """
        for name, value in (
            ("add_rounds", add_rounds),
            ("add_bytes_up", add_bytes_up),
            ("add_bytes_down", add_bytes_down),
        ):
            if value < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
        with self.session(write=True) as session:
            row = session.get(ClientRow, client_id)
            if row is None:
                at = time.time() if seen is None else seen
                row = ClientRow(
                    client_id=client_id,
                    fingerprint=fingerprint or "",
                    state=state or "idle",
                    first_seen=at,
                    last_seen=at,
                    rounds_joined=add_rounds,
                    bytes_up=add_bytes_up,
                    bytes_down=add_bytes_down,
                )
                session.add(row)
            else:
                # Counters are incremented in SQL so that no concurrent writer is lost.
                values: dict[str, Any] = {
                    "rounds_joined": col(ClientRow.rounds_joined) + add_rounds,
                    "bytes_up": col(ClientRow.bytes_up) + add_bytes_up,
                    "bytes_down": col(ClientRow.bytes_down) + add_bytes_down,
                }
                if fingerprint is not None:
                    values["fingerprint"] = fingerprint
                if state is not None:
                    values["state"] = state
                if seen is not None:
                    values["last_seen"] = max(seen, row.last_seen)
                session.exec(
                    update(ClientRow)
                    .where(col(ClientRow.client_id) == client_id)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
            session.flush()
            session.refresh(row)
            record = client_record(row)
            self.commit(session)
        return record

    def bump_client(
        self,
        client_id: str,
        *,
        state: str | None = None,
        seen: float | None = None,
        add_rounds: int = 0,
        add_bytes_up: int = 0,
        add_bytes_down: int = 0,
    ) -> None:
        """:meth:`upsert_client` for the hot paths: one UPDATE, nothing read back.

        Not durable on its own (counters and state are informational); a client not seen
        before is created through :meth:`upsert_client`.
        """
        for name, value in (
            ("add_rounds", add_rounds),
            ("add_bytes_up", add_bytes_up),
            ("add_bytes_down", add_bytes_down),
        ):
            if value < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
        values: dict[str, Any] = {}
        if add_rounds:
            values["rounds_joined"] = CLIENTS.c.rounds_joined + add_rounds
        if add_bytes_up:
            values["bytes_up"] = CLIENTS.c.bytes_up + add_bytes_up
        if add_bytes_down:
            values["bytes_down"] = CLIENTS.c.bytes_down + add_bytes_down
        if state is not None:
            values["state"] = state
        if seen is not None:
            last = CLIENTS.c.last_seen
            values["last_seen"] = case((last < seen, seen), else_=last)  # never backwards
        if not values:
            return
        with self.session(write=True, durable=False) as session:
            result = session.connection().execute(
                update(CLIENTS).where(CLIENTS.c.client_id == client_id).values(**values)
            )
            found = result.rowcount > 0
            self.commit(session)
        if not found:
            self.upsert_client(
                client_id,
                state=state,
                seen=seen,
                add_rounds=add_rounds,
                add_bytes_up=add_bytes_up,
                add_bytes_down=add_bytes_down,
            )

    def list_clients(self) -> list[ClientRecord]:
        """Return every known client, by id."""
        with self.session() as session:
            stmt = select(ClientRow).order_by(col(ClientRow.client_id))
            return [client_record(row) for row in session.exec(stmt)]
