"""SqlStore contract, run against a SQLite file and an in-memory SQLite database."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlmodel import SQLModel

from flctl.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StoreError,
)
from flctl.core.events import ROUND_QUEUED, UPDATE_ACCEPTED, Event
from flctl.store import TERMINAL, ModelRecord, RoundRecord, SqlStore

D1, D2, D3, D4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)


def _count(store: SqlStore) -> tuple[int, int, int]:
    """(models, in-progress rounds, committed rounds): a cheap fingerprint of what is written."""
    rounds = store.list_rounds()
    return (
        len(store.list_models()),
        len([r for r in rounds if r.status not in TERMINAL]),
        len([r for r in rounds if r.status == "committed"]),
    )


# -- models and head ------------------------------------------------------------------------


def test_models_count_from_one_and_head_moves_only_when_asked(store: SqlStore) -> None:
    assert store.head() is None
    assert store.list_models() == []
    first = store.add_model(digest=D1, kind="initial", metrics={"acc": 0.5})
    assert first.version == 1
    assert first.parent is None and first.server_round is None
    assert first.metrics == {"acc": 0.5}
    assert store.head() is None  # not set_head

    second = store.add_model(digest=D2, kind="import", parent=1, set_head=True)
    assert second.version == 2
    assert store.head() == second

    third = store.add_model(digest=D3, kind="rollback", parent=2)
    assert third.version == 3
    assert store.head() == second

    assert [m.version for m in store.list_models()] == [3, 2, 1]
    assert [m.version for m in store.list_models(limit=2)] == [3, 2]
    assert store.get_model(1) == first
    assert isinstance(first, ModelRecord)


def test_get_model_missing(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="model version 7 not found"):
        store.get_model(7)


def test_add_model_validates(store: SqlStore) -> None:
    with pytest.raises(InvalidInputError):
        store.add_model(digest=D1, kind="bogus")
    with pytest.raises(NotFoundError):
        store.add_model(digest=D1, kind="rollback", parent=42)
    with pytest.raises(InvalidInputError):
        store.add_model(digest=D1, kind="initial", metrics={"acc": "high"})  # type: ignore[dict-item]
    assert store.list_models() == []


def test_records_are_frozen(store: SqlStore) -> None:
    model = store.add_model(digest=D1, kind="initial")
    with pytest.raises(AttributeError):
        model.version = 5  # type: ignore[misc]


# -- rounds ---------------------------------------------------------------------------------


def test_rounds_queue_in_order(store: SqlStore) -> None:
    assert store.next_queued_round() is None
    assert store.create_rounds(3, {"lr": 0.01}) == [1, 2, 3]
    assert store.create_rounds(2) == [4, 5]
    rnd = store.get_round(1)
    assert isinstance(rnd, RoundRecord)
    assert rnd.status == "queued" and rnd.config == {"lr": 0.01}
    assert rnd.started is None and rnd.duration_s is None
    assert store.get_round(4).config == {}

    queued = store.next_queued_round()
    assert queued is not None and queued.id == 1
    store.set_round_status(1, "selecting", started=100.0, base_version=None)
    queued = store.next_queued_round()
    assert queued is not None and queued.id == 2
    assert [r.id for r in store.open_rounds()] == [1]
    store.set_round_status(3, "training")
    assert [r.id for r in store.open_rounds()] == [1, 3]
    store.fail_round(1, "no clients")
    assert [r.id for r in store.open_rounds()] == [3]
    next_up = store.next_queued_round()
    assert next_up is not None and next_up.id == 2


def test_list_rounds(store: SqlStore) -> None:
    store.create_rounds(5)
    assert [r.id for r in store.list_rounds()] == [1, 2, 3, 4, 5]
    assert [r.id for r in store.list_rounds(limit=2)] == [4, 5]
    assert [r.id for r in store.list_rounds(ids=[4, 2, 99])] == [2, 4]
    assert store.list_rounds(ids=[]) == []
    # pages backwards: the newest 2 below round 4, then below round 2
    assert [r.id for r in store.list_rounds(limit=2, before=4)] == [2, 3]
    assert [r.id for r in store.list_rounds(limit=2, before=2)] == [1]
    assert store.count_rounds() == 5


def test_create_rounds_validates(store: SqlStore) -> None:
    for bad in (0, -1):
        with pytest.raises(InvalidInputError):
            store.create_rounds(bad)
    with pytest.raises(InvalidInputError):
        store.create_rounds(1, {"x": object()})
    assert store.list_rounds() == []


def test_get_round_missing(store: SqlStore) -> None:
    with pytest.raises(NotFoundError, match="round 3 not found"):
        store.get_round(3)
    with pytest.raises(NotFoundError):
        store.set_round_status(3, "training")
    with pytest.raises(NotFoundError):
        store.commit_round(3, digest=D1, metrics={}, num_clients=0)


def test_set_round_status_sets_fields(store: SqlStore) -> None:
    (rid,) = store.create_rounds(1)
    rnd = store.set_round_status(
        rid,
        "training",
        started=10.0,
        base_version=None,
        selected=["b", "a"],
        deadline=70.0,
    )
    assert rnd.status == "training"
    assert rnd.started == 10.0 and rnd.deadline == 70.0
    assert rnd.selected == ["b", "a"]
    assert rnd.ended is None
    # None leaves fields alone
    rnd = store.set_round_status(rid, "aggregating")
    assert rnd.selected == ["b", "a"] and rnd.started == 10.0

    rnd = store.set_round_status(rid, "cancelled", reason="by admin", ended=25.0)
    assert rnd.status == "cancelled" and rnd.reason == "by admin"
    assert rnd.duration_s == 15.0


def test_terminal_status_sets_ended(store: SqlStore) -> None:
    (rid,) = store.create_rounds(1)
    store.set_round_status(rid, "training", started=1.0)
    rnd = store.fail_round(rid, "quorum not reached")
    assert rnd.status == "failed" and rnd.reason == "quorum not reached"
    assert rnd.ended is not None and rnd.ended > 1.0


@pytest.mark.parametrize("terminal", ["failed", "cancelled", "committed", "rejected"])
def test_set_round_status_refuses_terminal_round(store: SqlStore, terminal: str) -> None:
    (rid,) = store.create_rounds(1)
    if terminal == "committed":
        store.commit_round(rid, digest=D1, metrics={}, num_clients=1)
    elif terminal == "rejected":
        store.commit_round(
            rid, digest=D1, metrics={}, num_clients=1, status="rejected", reason="gate"
        )
    else:
        store.fail_round(rid, "x", status=terminal)
    before = store.get_round(rid)
    with pytest.raises(ConflictError, match=f"already {terminal}"):
        store.set_round_status(rid, "training")
    with pytest.raises(ConflictError):
        store.fail_round(rid, "again")
    assert store.get_round(rid) == before


def test_set_round_status_validates(store: SqlStore) -> None:
    (rid,) = store.create_rounds(1)
    with pytest.raises(InvalidInputError):
        store.set_round_status(rid, "done")
    with pytest.raises(InvalidInputError, match="commit_round"):
        store.set_round_status(rid, "committed")
    with pytest.raises(InvalidInputError):
        store.fail_round(rid, "x", status="training")
    assert store.get_round(rid).status == "queued"


def test_commit_round_is_one_transaction(store: SqlStore) -> None:
    base = store.add_model(digest=D1, kind="initial", set_head=True)
    store.create_rounds(2)
    store.set_round_status(1, "aggregating", started=5.0, base_version=base.version)

    model = store.commit_round(1, digest=D2, metrics={"loss": 0.25}, num_clients=3)
    assert model.version == 2
    assert model.kind == "aggregate"
    assert model.parent == base.version
    assert model.server_round == 1
    assert model.metrics == {"loss": 0.25}
    assert store.head() == model

    rnd = store.get_round(1)
    assert rnd.status == "committed"
    assert rnd.model_version == 2
    assert rnd.metrics == {"loss": 0.25}
    assert rnd.num_clients == 3
    assert rnd.base_version == 1
    assert rnd.ended is not None and rnd.duration_s is not None

    # Second commit of the same round: refused, and nothing at all is written.
    before = (_count(store), store.get_round(1), store.head())
    with pytest.raises(ConflictError):
        store.commit_round(1, digest=D3, metrics={"loss": 0.1}, num_clients=9)
    assert (_count(store), store.get_round(1), store.head()) == before
    assert D3 not in store.referenced_digests()


def test_commit_round_without_head(store: SqlStore) -> None:
    (rid,) = store.create_rounds(1)
    model = store.commit_round(rid, digest=D1, metrics={}, num_clients=1)
    assert model.version == 1 and model.parent is None
    assert store.head() == model


def test_commit_round_refused_for_failed_round(store: SqlStore) -> None:
    store.add_model(digest=D1, kind="initial", set_head=True)
    (rid,) = store.create_rounds(1)
    store.fail_round(rid, "deadline", status="cancelled")
    with pytest.raises(ConflictError, match="already cancelled"):
        store.commit_round(rid, digest=D2, metrics={}, num_clients=1)
    assert [m.version for m in store.list_models()] == [1]
    head = store.head()
    assert head is not None and head.version == 1


def test_fail_round_leaves_head(store: SqlStore) -> None:
    head = store.add_model(digest=D1, kind="initial", set_head=True)
    (rid,) = store.create_rounds(1)
    store.fail_round(rid, "boom")
    assert store.head() == head


# -- updates and referenced digests -----------------------------------------------------------


def test_updates(store: SqlStore) -> None:
    store.create_rounds(2)
    up = store.add_update(
        server_round=1,
        client_id="c1",
        task_id="t1",
        status="accepted",
        digest=D1,
        size=1 << 33,  # past 32 bits
        num_examples=10,
        metrics={"loss": 1.5},
    )
    assert up.id == 1 and up.size == 1 << 33 and up.metrics == {"loss": 1.5}
    store.add_update(server_round=1, client_id="c2", task_id="t2", status="rejected", reason="late")
    store.add_update(
        server_round=99, client_id="c3", task_id="t3", status="rejected", reason="wrong"
    )

    assert [u.client_id for u in store.updates_for_round(1)] == ["c1", "c2"]
    assert [u.client_id for u in store.updates_for_round(1, "accepted")] == ["c1"]
    rejected = store.updates_for_round(1, "rejected")
    assert [(u.client_id, u.reason) for u in rejected] == [("c2", "late")]
    assert store.has_accepted_update(1, "c1")
    assert not store.has_accepted_update(1, "c2")
    assert not store.has_accepted_update(2, "c1")
    with pytest.raises(InvalidInputError):
        store.add_update(server_round=1, client_id="c", task_id="t", status="maybe")


def test_referenced_digests(store: SqlStore) -> None:
    assert store.referenced_digests() == set()
    store.add_model(digest=D1, kind="initial", set_head=True)
    store.create_rounds(2)
    store.set_round_status(1, "training")
    store.set_round_status(2, "training")
    store.add_update(server_round=1, client_id="a", task_id="t", status="accepted", digest=D2)
    store.add_update(server_round=2, client_id="a", task_id="t", status="accepted", digest=D3)
    store.add_update(server_round=2, client_id="b", task_id="t", status="rejected", digest=D4)
    assert store.referenced_digests() == {D1, D2, D3}
    store.fail_round(2, "x")
    assert store.referenced_digests() == {D1, D2}
    store.commit_round(1, digest=D4, metrics={}, num_clients=1)
    assert store.referenced_digests() == {D1, D4}


# -- clients --------------------------------------------------------------------------------


def test_client_upsert_accumulates(store: SqlStore) -> None:
    first = store.upsert_client("c1", fingerprint="fp", state="idle", seen=100.0, add_rounds=1)
    assert (first.first_seen, first.last_seen, first.rounds_joined) == (100.0, 100.0, 1)
    store.upsert_client("c1", add_bytes_up=10, add_bytes_down=3)
    store.upsert_client("c1", add_bytes_up=5, add_rounds=2, state="training", seen=150.0)
    later = store.upsert_client("c1", seen=120.0)  # last_seen never moves back
    assert later.client_id == "c1"
    assert later.fingerprint == "fp"
    assert later.state == "training"
    assert later.first_seen == 100.0 and later.last_seen == 150.0
    assert later.rounds_joined == 3
    assert later.bytes_up == 15 and later.bytes_down == 3

    store.upsert_client("a0")
    assert [c.client_id for c in store.list_clients()] == ["a0", "c1"]
    with pytest.raises(InvalidInputError):
        store.upsert_client("c1", add_bytes_up=-1)


# -- events ---------------------------------------------------------------------------------


def test_events_are_gap_free_and_resumable(store: SqlStore) -> None:
    assert store.last_event_seq() == 0
    assert store.events_since(0) == []
    appended = [
        store.append_event(ROUND_QUEUED, server_round=i, data={"i": i}) for i in range(1, 11)
    ]
    appended.append(store.append_event(UPDATE_ACCEPTED, server_round=1, client_id="c1"))
    assert [e.seq for e in appended] == list(range(1, 12))
    assert store.last_event_seq() == 11
    assert all(isinstance(e, Event) for e in appended)

    assert store.events_since(0) == appended
    assert store.events_since(8) == appended[8:]
    assert store.events_since(3, limit=2) == appended[3:5]
    assert store.events_since(11) == []
    last = store.events_since(10)[0]
    assert (last.type, last.client_id, last.data) == (UPDATE_ACCEPTED, "c1", {})
    assert store.events_since(0)[4].data == {"i": 5}

    with pytest.raises(InvalidInputError):
        store.append_event("x", data={"bad": object()})
    assert store.last_event_seq() == 11


def test_events_page_reads_newest_first_by_type(store: SqlStore) -> None:
    for i in range(1, 6):
        store.append_event(ROUND_QUEUED, server_round=i)  # an admin event
        store.append_event(UPDATE_ACCEPTED, server_round=i, client_id="c1")
    store.append_event("roundabout.x")  # shares the prefix's letters, not its dot
    assert [e.seq for e in store.events_page(limit=3)] == [11, 10, 9]
    assert [e.seq for e in store.events_page(before_seq=9, limit=3)] == [8, 7, 6]
    assert [e.seq for e in store.events_page(limit=2, type_filter="round")] == [9, 7]
    assert [e.seq for e in store.events_page(limit=2, type_filter=ROUND_QUEUED)] == [9, 7]
    assert [e.seq for e in store.events_page(type_filter="update", before_seq=5)] == [4, 2]
    assert [e.type for e in store.events_page(limit=1, type_filter="admin")] == [ROUND_QUEUED]
    assert store.events_page(type_filter="round%") == []  # no wildcards
    assert store.events_page(before_seq=1) == []
    assert [e.seq for e in store.events_page(server_round=2)] == [4, 3]
    assert [e.seq for e in store.events_page(server_round=2, type_filter="update")] == [4]
    by_round = store.round_events([2, 3, 99], {ROUND_QUEUED})
    assert {r: [e.seq for e in es] for r, es in by_round.items()} == {2: [3], 3: [5]}
    assert [e.seq for e in store.round_events([2])[2]] == [3, 4]
    assert store.round_events([]) == {}


def test_events_from_threads_stay_gap_free(store: SqlStore) -> None:
    def writer() -> None:
        for _ in range(10):
            store.append_event("t")

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in store.events_since(0, limit=1000)] == list(range(1, 41))


# -- file-backed specifics ------------------------------------------------------------------


def test_state_survives_reopen(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path / "s") as store:
        store.add_model(digest=D1, kind="initial", set_head=True)
        store.create_rounds(2)
        store.append_event("x")
    with SqlStore.open(tmp_path / "s") as store:
        head = store.head()
        assert head is not None and head.digest == D1
        assert store.create_rounds(1) == [3]
        assert store.append_event("y").seq == 2


def test_two_stores_on_one_file_do_not_collide(tmp_path: Path) -> None:
    """Two coordinators' worth of connections (no shared lock) still number models 1..N."""
    stores = [SqlStore.open(tmp_path), SqlStore.open(tmp_path)]
    errors: list[BaseException] = []

    def writer(store: SqlStore) -> None:
        try:
            for _ in range(8):
                store.add_model(digest=D1, kind="import", set_head=True)
                store.append_event("x")
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(m.version for m in stores[0].list_models()) == list(range(1, 17))
    assert [e.seq for e in stores[1].events_since(0)] == list(range(1, 17))
    for store in stores:
        store.close()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        store.append_event("x")
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest.mark.parametrize("written", ["99", "garbage"])
def test_schema_mismatch_detected(tmp_path: Path, written: str) -> None:
    SqlStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (written,))
    conn.close()
    with pytest.raises(SchemaMismatchError, match="schema version") as info:
        SqlStore.open(tmp_path)
    assert info.value.details["expected"] == SqlStore.SCHEMA_VERSION


def test_tables_without_schema_version_are_refused(tmp_path: Path) -> None:
    SqlStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    with conn:
        conn.execute("DELETE FROM meta")
    conn.close()
    with pytest.raises(SchemaMismatchError):
        SqlStore.open(tmp_path)


def test_unopenable_database_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqlStore(f"sqlite:///{tmp_path}/missing/dir/state.db")


def test_own_metadata_leaves_the_global_one_alone() -> None:
    stores = [SqlStore("sqlite://") for _ in range(3)]
    for i, store in enumerate(stores):
        assert store.create_rounds(i + 1)[-1] == i + 1
    for store in stores:
        store.close()
    assert not set(SQLModel.metadata.tables) & {"models", "rounds", "events", "meta"}
