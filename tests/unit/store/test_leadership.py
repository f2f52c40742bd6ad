"""Leadership on a real PostgreSQL server: one leader, epochs, fencing, take-over."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from flctl.core.errors import ConfigError, FencedError, StoreUnavailableError
from flctl.store import Leadership, SqlStore, list_coordinators, list_leaders
from tests.postgres import PostgresServer


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    a, b = SqlStore(pg_url), SqlStore(pg_url)
    yield a, b
    a.close()
    b.close()


def _kill_lock_holder(postgres_server: PostgresServer, url: str) -> None:
    """End the session that holds the advisory lock, as a dead leader's machine would."""
    database = url.rsplit("/", 1)[1]
    port = postgres_server.port
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=flctl dbname={database}", autocommit=True
    ) as connection:
        killed = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        ).fetchall()
    assert killed == [(True,)]


def test_one_leader_at_a_time_and_both_are_listed(stores: tuple[SqlStore, SqlStore]) -> None:
    a, b = stores
    first, second = Leadership(a, "10.0.0.1:7070"), Leadership(b, "10.0.0.2:7070")
    try:
        assert first.try_acquire() is True
        assert second.try_acquire() is False
        assert (first.epoch, second.epoch) == (1, 0)
        roles = {c.address: (c.role, c.epoch) for c in list_coordinators(a)}
        assert roles == {"10.0.0.1:7070": ("leader", 1), "10.0.0.2:7070": ("standby", 0)}
        assert first.leader() is not None and first.leader().address == "10.0.0.1:7070"  # type: ignore[union-attr]
        # the leader writes; events carry its epoch
        event = a.append_event("model.created")
        assert event.seq == 1
        first.check()
    finally:
        first.release()
        second.release()


def test_a_released_leadership_passes_on_with_the_next_epoch(
    stores: tuple[SqlStore, SqlStore],
) -> None:
    a, b = stores
    first, second = Leadership(a, "a:1"), Leadership(b, "b:1")
    try:
        assert first.try_acquire()
        first.release("stopped")
        assert second.try_acquire() and second.epoch == 2
        leaders = list_leaders(b)
        assert [(x.epoch, x.address, x.end_reason) for x in leaders] == [
            (1, "a:1", "stopped"),
            (2, "b:1", ""),
        ]
        assert leaders[0].ended is not None and leaders[1].ended is None
        # a store whose leader stepped down writes no more
        with pytest.raises(FencedError):
            a.append_event("model.created")
        assert b.append_event("model.created").seq == 1
    finally:
        second.release()


def test_a_paused_old_leader_is_fenced_after_a_take_over(
    stores: tuple[SqlStore, SqlStore], postgres_server: PostgresServer, pg_url: str
) -> None:
    a, b = stores
    old, new = Leadership(a, "old:1"), Leadership(b, "new:1")
    try:
        assert old.try_acquire()
        a.append_event("round.started")
        # the old leader's lock session dies (its machine paused, its connection cut) ...
        _kill_lock_holder(postgres_server, pg_url)
        assert new.try_acquire() and new.epoch == 2
        b.append_event("round.started")
        # ... and when it wakes up, every write it tries is refused: nothing lands
        with pytest.raises(FencedError, match="epoch 2"):
            a.append_event("round.committed")
        with pytest.raises(FencedError):
            a.create_rounds(1)
        with pytest.raises((StoreUnavailableError, FencedError)):
            old.check()
        events = b.events_since(0)
        assert [(e.seq, e.type) for e in events] == [(1, "round.started"), (2, "round.started")]
        with b.session() as session:
            rows = session.connection().exec_driver_sql("SELECT epoch FROM events ORDER BY seq")
            assert [row[0] for row in rows] == [1, 2]
        assert b.list_rounds() == []
    finally:
        old.release()
        new.release()


def test_leadership_needs_postgresql() -> None:
    store = SqlStore("sqlite://")
    try:
        with pytest.raises(ConfigError, match="PostgreSQL"):
            Leadership(store, "127.0.0.1:7070")
    finally:
        store.close()
