"""store.transaction(): a change and the events that describe it land together, or not at all."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from flctl.core.errors import ConflictError, InvalidInputError, NotFoundError
from flctl.core.events import MODEL_ROLLBACK, ROUND_COMMITTED, UPDATE_ACCEPTED, Event
from flctl.store import SqlStore

D1, D2 = "1" * 64, "2" * 64


class _Heard:
    def __init__(self, store: SqlStore) -> None:
        self.batches: list[list[int]] = []
        store.on_events = self

    def __call__(self, events: Sequence[Event]) -> None:
        self.batches.append([e.seq for e in events])


def test_writes_and_events_commit_together_and_are_announced_once(store: SqlStore) -> None:
    heard = _Heard(store)
    store.add_model(digest=D1, kind="initial", set_head=True)
    (round_id,) = store.create_rounds(1)
    with store.transaction():
        model = store.commit_round(round_id, digest=D2, metrics={"loss": 1.0}, num_clients=1)
        first = store.append_event(ROUND_COMMITTED, server_round=round_id)
        second = store.append_event("model.created", data={"version": model.version})
        assert heard.batches == []  # nothing is announced before the commit
    assert heard.batches == [[first.seq, second.seq]]
    assert store.head() == model
    assert [e.seq for e in store.events_since(0)] == [first.seq, second.seq]


def test_a_failure_inside_leaves_no_change_and_no_event(store: SqlStore) -> None:
    heard = _Heard(store)
    store.add_model(digest=D1, kind="initial", set_head=True)
    (round_id,) = store.create_rounds(1)
    before = store.last_event_seq()
    with pytest.raises(ConflictError), store.transaction():
        store.commit_round(round_id, digest=D2, metrics={}, num_clients=1)
        store.append_event(ROUND_COMMITTED, server_round=round_id)
        store.set_head(store.head().version, author="local")  # type: ignore[union-attr]
    assert store.get_round(round_id).status == "queued"
    assert [m.version for m in store.list_models()] == [1]
    assert store.last_event_seq() == before
    assert heard.batches == []
    # the store is usable afterwards, and seqs stay gap-free
    event = store.append_event(UPDATE_ACCEPTED)
    assert event.seq == before + 1
    assert heard.batches == [[event.seq]]


def test_an_exception_of_the_caller_rolls_back_too(store: SqlStore) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.add_model(digest=D1, kind="initial", set_head=True)
        store.append_event("model.created")
        raise RuntimeError("the caller changed its mind")
    assert store.list_models() == []
    assert store.last_event_seq() == 0


def test_nested_transactions_join_the_outer_one(store: SqlStore) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        with store.transaction():
            store.add_model(digest=D1, kind="initial", set_head=True)
        assert store.head() is not None  # visible inside
        raise RuntimeError("outer fails")
    assert store.head() is None


def test_other_threads_wait_for_the_transaction(store: SqlStore) -> None:
    seen: list[int] = []
    inside = threading.Event()

    def reader() -> None:
        inside.wait(5)
        seen.append(len(store.list_models()))

    thread = threading.Thread(target=reader)
    thread.start()
    with store.transaction():
        store.add_model(digest=D1, kind="initial", set_head=True)
        inside.set()
        thread.join(0.3)
        assert thread.is_alive()  # blocked on the store until the commit
        store.add_model(digest=D2, kind="import", parent=1)
    thread.join(5)
    assert seen == [2]


def test_single_calls_announce_their_own_events(store: SqlStore) -> None:
    heard = _Heard(store)
    a = store.append_event(MODEL_ROLLBACK)
    b = store.append_event(MODEL_ROLLBACK)
    assert heard.batches == [[a.seq], [b.seq]]


# -- deferred rollbacks (schema 5) ------------------------------------------------------------


def test_deferred_rollbacks_persist_in_order_until_dropped(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        store.add_model(digest=D1, kind="initial", set_head=True)
        store.add_model(digest=D2, kind="import", parent=1, set_head=True)
        first = store.defer_rollback(1, author="admin", reason="bad", server_round=7)
        second = store.defer_rollback(2, author="admin", reason="", server_round=7)
        with pytest.raises(NotFoundError):
            store.defer_rollback(99, author="admin", reason="", server_round=7)
    with SqlStore.open(tmp_path) as store:  # a restarted coordinator finds them
        assert store.pending_rollbacks() == [first, second]
        assert (first.source, first.author, first.reason, first.server_round) == (
            1,
            "admin",
            "bad",
            7,
        )
        store.drop_pending_rollback(first.id)
        store.drop_pending_rollback(first.id)  # unknown ids are ignored
        assert store.pending_rollbacks() == [second]


# -- the hot paths: informational writes ----------------------------------------------------


def test_bump_client_adds_counters_in_one_update_and_never_moves_last_seen_back(
    store: SqlStore,
) -> None:
    store.upsert_client("c1", seen=100.0)
    store.bump_client("c1", add_bytes_down=10, add_bytes_up=4, add_rounds=1, seen=150.0)
    store.bump_client("c1", add_bytes_down=5, state="offline", seen=120.0)
    (client,) = store.list_clients()
    assert (client.bytes_down, client.bytes_up, client.rounds_joined) == (15, 4, 1)
    assert (client.state, client.last_seen, client.first_seen) == ("offline", 150.0, 100.0)
    store.bump_client("new", add_bytes_down=7)  # unknown: created
    assert {c.client_id: c.bytes_down for c in store.list_clients()} == {"c1": 15, "new": 7}
    with pytest.raises(InvalidInputError):
        store.bump_client("c1", add_bytes_up=-1)


def test_informational_writes_survive_a_reopen(tmp_path: Path) -> None:
    """durable=False skips waiting for the disk, not the write: a killed process keeps it."""
    with SqlStore.open(tmp_path) as store:
        heard = _Heard(store)
        event = store.append_event("client.state", client_id="c1", durable=False)
        store.bump_client("c1", add_bytes_down=3)
        assert heard.batches == [[event.seq]]
    with SqlStore.open(tmp_path) as store:
        assert [e.seq for e in store.events_since(0)] == [event.seq]
        assert store.list_clients()[0].bytes_down == 3
