from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from flctl.core.errors import InvalidInputError
from flctl.core.events import IDENTITY_REVOKED
from flctl.store import (
    LOCAL_AUTHOR,
    SqlStore,
    is_revoked,
    list_revocations,
    revoke,
    revoked_identities,
)

BIG_SERIAL = (1 << 159) + 12345  # certificate serials have up to 159 bits, more than BIGINT


def test_identity_wide_revocation(store: SqlStore) -> None:
    record = revoke(store, "c7", reason="lost laptop")
    assert (record.identity, record.serial, record.author) == ("c7", None, LOCAL_AUTHOR)
    assert record.covers_all and record.reason == "lost laptop" and record.id == 1
    assert is_revoked(store, "c7") and is_revoked(store, "c7", BIG_SERIAL)
    assert not is_revoked(store, "c8") and not is_revoked(store, "C7")
    assert revoked_identities(store) == {"c7"}


def test_one_certificate(store: SqlStore) -> None:
    record = revoke(store, "c8", serial=BIG_SERIAL, author="ops")
    assert record.serial == BIG_SERIAL and not record.covers_all
    assert is_revoked(store, "c8", BIG_SERIAL)
    assert not is_revoked(store, "c8", BIG_SERIAL + 1)
    assert not is_revoked(store, "c8")  # the identity as a whole is not revoked
    assert not is_revoked(store, "c9", BIG_SERIAL)  # serials are per identity
    assert revoked_identities(store) == set()


def test_listing_and_events(store: SqlStore) -> None:
    first = revoke(store, "c7", reason="r1")
    second = revoke(store, "c8", serial=0xABC, author="ops")
    again = revoke(store, "c7")  # recorded again: the audit trail keeps every request
    assert [r.id for r in list_revocations(store)] == [first.id, second.id, again.id]
    assert [r.identity for r in list_revocations(store, "c7")] == ["c7", "c7"]
    events = store.events_since(0)
    assert [e.seq for e in events] == [first.event_seq, second.event_seq, again.event_seq]
    assert all(e.type == IDENTITY_REVOKED for e in events)
    assert events[1].client_id == "c8"
    assert events[1].data == {"serial": "abc", "reason": "", "author": "ops"}
    assert events[0].data == {"serial": None, "reason": "r1", "author": "local"}


def test_without_event(store: SqlStore) -> None:
    record = revoke(store, "c7", author="ops", record_event=False)
    assert record.event_seq == 0 and store.events_since(0) == []
    assert is_revoked(store, "c7")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"identity": ""},
        {"identity": "x" * 256},
        {"identity": 7},
        {"author": ""},
        {"reason": "r" * 1025},
        {"serial": 0},
        {"serial": -1},
        {"serial": 1 << 160},
        {"serial": True},
        {"serial": "abc"},
    ],
)
def test_bad_arguments_write_nothing(store: SqlStore, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"identity": "c7", **kwargs}
    identity = args.pop("identity")
    with pytest.raises(InvalidInputError):
        revoke(store, identity, **args)  # type: ignore[arg-type]
    assert list_revocations(store) == [] and store.events_since(0) == []


def test_survives_reopening(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        revoke(store, "c7", serial=BIG_SERIAL)
    with SqlStore.open(tmp_path) as store:
        assert is_revoked(store, "c7", BIG_SERIAL)


def test_a_database_without_the_table_gets_it(tmp_path: Path) -> None:
    """Databases written before revocations existed get the table when next opened."""
    SqlStore.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        db.execute("DROP TABLE revocations")
        db.commit()
    finally:
        db.close()
    with SqlStore.open(tmp_path) as store:
        assert list_revocations(store) == []
        revoke(store, "c7")
        assert revoked_identities(store) == {"c7"}
