"""SqlStore.open and the state folder: who may create, read-only opens, the marker, migrations."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from flctl.core.errors import (
    CorruptStoreError,
    NotFoundError,
    SchemaMismatchError,
    StoreError,
    StoreLostError,
)
from flctl.store import BlobStore, SqlStore, require_store


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_fresh_folder_gets_a_store_and_its_marker(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path / "state") as store:
        store_id = store.store_id
    marker = json.loads((tmp_path / "state" / "store.json").read_text())
    assert marker["store_id"] == store_id and len(store_id) == 32
    assert marker["schema_version"] == SqlStore.SCHEMA_VERSION
    with SqlStore.open(tmp_path / "state") as store:  # opening again keeps the id
        assert store.store_id == store_id


def test_read_only_never_creates(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no state store"):
        SqlStore.open(tmp_path / "state", read_only=True)
    assert not (tmp_path / "state").exists()


def test_read_only_reads_and_refuses_writes(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        store.add_model(digest="ab" * 32, kind="initial", set_head=True)
    before = (tmp_path / "state.db").read_bytes()
    with SqlStore.open(tmp_path, read_only=True) as store:
        assert store.head() is not None and store.head().version == 1  # type: ignore[union-attr]
        with pytest.raises(StoreError):
            store.add_model(digest="cd" * 32, kind="import")
    assert (tmp_path / "state.db").read_bytes() == before


@pytest.mark.parametrize("trace", ["marker", "blob"])
def test_a_lost_database_is_refused_when_the_folder_held_a_store(
    tmp_path: Path, trace: str
) -> None:
    SqlStore.open(tmp_path).close()
    if trace == "blob":
        (tmp_path / "store.json").unlink()  # a store from before the marker: its blobs tell
        BlobStore(tmp_path / "blobs").put_bytes(b"weights")
    (tmp_path / "state.db").unlink()
    before = _files(tmp_path)
    for read_only in (True, False):
        with pytest.raises(StoreLostError, match="held a store") as info:
            SqlStore.open(tmp_path, read_only=read_only)
        assert "flctl store restore" in (info.value.hint or "")
    assert _files(tmp_path) == before


def test_new_state_sets_the_old_database_aside(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        old_id = store.store_id
    (tmp_path / "state.db").write_bytes(b"")
    with SqlStore.open(tmp_path, new_state=True) as store:
        assert store.store_id != old_id
        assert store.replaced_path is not None and store.replaced_path.stat().st_size == 0
    assert json.loads((tmp_path / "store.json").read_text())["store_id"] != old_id


def test_a_database_of_another_store_is_refused(tmp_path: Path) -> None:
    SqlStore.open(tmp_path / "a").close()
    SqlStore.open(tmp_path / "b").close()
    (tmp_path / "a" / "state.db").write_bytes((tmp_path / "b" / "state.db").read_bytes())
    with pytest.raises(StoreLostError, match="another store"):
        SqlStore.open(tmp_path / "a")


def test_flipped_bytes_are_a_corrupt_store(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        for n in range(200):
            store.append_event("model.tagged", data={"note": "é" * 40, "n": n})
    data = bytearray((tmp_path / "state.db").read_bytes())
    for offset in range(100, len(data), 251):
        data[offset] ^= 0x80
    (tmp_path / "state.db").write_bytes(bytes(data))
    for read_only in (True, False):
        with pytest.raises(CorruptStoreError, match="state database is corrupt"):
            SqlStore.open(tmp_path, read_only=read_only, deep_check=True)
    with pytest.raises(CorruptStoreError):
        require_store(tmp_path, deep=True)


def _downgrade_to_4(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DROP TABLE pending_rollbacks")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.close()


def test_migration_backs_up_first(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        store.add_model(digest="ab" * 32, kind="initial", set_head=True)
    _downgrade_to_4(tmp_path / "state.db")
    before = (tmp_path / "state.db").read_bytes()
    # read-only commands neither migrate nor write
    with pytest.raises(SchemaMismatchError, match="schema version 4") as info:
        SqlStore.open(tmp_path, read_only=True)
    assert "backs the database up" in (info.value.hint or "")
    assert (tmp_path / "state.db").read_bytes() == before
    with SqlStore.open(tmp_path) as store:
        assert store.migrated_from == 4 and store.backup_path is not None
        backup = store.backup_path
        assert store.pending_rollbacks() == []
    assert backup.parent == tmp_path / "backups"
    conn = sqlite3.connect(backup)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert meta["schema_version"] == "4"
        assert conn.execute("SELECT COUNT(*) FROM models").fetchone() == (1,)
    finally:
        conn.close()
    marker = json.loads((tmp_path / "store.json").read_text())
    assert marker["schema_version"] == SqlStore.SCHEMA_VERSION
    with SqlStore.open(tmp_path) as store:  # up to date now: no second backup
        assert store.backup_path is None
