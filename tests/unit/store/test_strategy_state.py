"""Schema 6: the strategy's state with each model version, its per-client fit config per round."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flctl.store import SqlStore

D1, D2, D3, S2, S3 = ("1" * 64, "2" * 64, "3" * 64, "a" * 64, "b" * 64)


def _round_in_training(store: SqlStore, fit: dict[str, dict[str, object]]) -> int:
    (server_round,) = store.create_rounds(1)
    store.set_round_status(server_round, "selecting")
    store.set_round_status(
        server_round,
        "training",
        base_version=store.head().version,  # type: ignore[union-attr]
        selected=sorted(fit),
        deadline=1e12,
        tasks={c: f"t-{c}" for c in fit},
        fit_config=fit,
    )
    return server_round


def test_state_goes_with_its_version_and_back_with_a_rollback(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        assert store.add_model(digest=D1, kind="initial", set_head=True).state_digest == ""
        fit = {"c1": {"proximal_mu": 0.1}, "c2": {"proximal_mu": 0.1, "lr": 0.5}}
        first = _round_in_training(store, fit)
        assert store.get_round(first).fit_config == fit
        v2 = store.commit_round(first, digest=D2, metrics={}, num_clients=2, state_digest=S2)
        second = _round_in_training(store, {})
        assert store.get_round(second).fit_config == {}
        v3 = store.commit_round(second, digest=D3, metrics={}, num_clients=2, state_digest=S3)
        assert (v2.state_digest, v3.state_digest) == (S2, S3)
        assert store.head() == v3 and store.get_model(2).state_digest == S2
        # the blobs of the states are kept by gc
        assert {S2, S3} <= store.referenced_digests()
        back = store.set_head(2, author="admin")
        assert (back.digest, back.state_digest, back.source) == (D2, S2, 2)
        assert store.head() == back
        back_to_start = store.set_head(1, author="admin")
        assert back_to_start.state_digest == ""
        assert store.import_model(D3, head=True, author="admin").state_digest == ""


def test_a_version_5_database_is_migrated(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        store.add_model(digest=D1, kind="initial", set_head=True)
        _round_in_training(store, {"c1": {}})
    conn = sqlite3.connect(tmp_path / "state.db")
    with conn:
        conn.execute("ALTER TABLE models DROP COLUMN state_digest")
        conn.execute("ALTER TABLE rounds DROP COLUMN fit_config")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    conn.close()
    with SqlStore.open(tmp_path) as store:
        assert store.migrated_from == 5 and store.backup_path is not None
        assert store.get_model(1).state_digest == ""
        assert store.get_round(1).fit_config == {}
        v2 = store.commit_round(1, digest=D2, metrics={}, num_clients=1, state_digest=S2)
        assert store.get_model(v2.version).state_digest == S2
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SqlStore.SCHEMA_VERSION),)
    finally:
        conn.close()
