"""The coordinator's event log: typed payloads in, the same persisted events out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flctl.coordinator._events import EventLog
from flctl.core import Event
from flctl.core import events as ev
from flctl.store import SqlStore


@pytest.fixture
def store() -> Iterator[SqlStore]:
    store = SqlStore("sqlite://")
    yield store
    store.close()


def test_a_payload_is_stored_as_its_type_and_data(store: SqlStore) -> None:
    log = EventLog(store)
    heard: list[Event] = []
    log.subscribe(heard.append)
    payload = ev.ClientLeft(reason="certificate expired", is_expired=True)
    event = log.emit(payload, server_round=3, client_id="c1", durable=False)
    (stored,) = store.events_since(0)
    for got in (event, stored, heard[0]):
        assert (got.type, got.server_round, got.client_id) == (ev.CLIENT_LEFT, 3, "c1")
        assert got.data == {"reason": "certificate expired", "expired": True}
    assert log.last_seq == stored.seq
