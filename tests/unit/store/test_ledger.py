from __future__ import annotations

from pathlib import Path

import pytest

from flctl.core.errors import InvalidInputError
from flctl.store import SqlStore, charge, ledger


def test_charge_and_list_in_order(store: SqlStore) -> None:
    assert ledger(store) == []
    first = charge(
        store,
        1,
        mechanism="central",
        noise_multiplier=1.1,
        sampling="poisson",
        sampling_rate=0.5,
        clip_norm=1.0,
        epsilon_rdp=0.8,
        epsilon_pld=0.6,
        delta=1e-5,
    )
    second = charge(
        store,
        2,
        mechanism="central",
        noise_multiplier=1.1,
        sampling="fixed",
        sampling_rate=0.5,
        population=4,
        sample_size=2,
        clip_norm=1.0,
        epsilon_rdp=1.2,
        delta=1e-5,
    )
    rows = ledger(store)
    assert rows == [first, second]
    assert [r.id for r in rows] == [1, 2]
    assert (rows[0].epsilon_pld, rows[0].population) == (0.6, None)
    assert (rows[1].epsilon_pld, rows[1].population, rows[1].sample_size) == (None, 4, 2)


def test_charge_refuses_bad_values(store: SqlStore) -> None:
    common = {
        "noise_multiplier": 1.0,
        "sampling_rate": 0.5,
        "clip_norm": 1.0,
        "epsilon_rdp": 1.0,
        "delta": 1e-5,
    }
    with pytest.raises(InvalidInputError):
        charge(store, 1, mechanism="other", sampling="poisson", **common)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        charge(store, 1, mechanism="central", sampling="fixed", **common)
    with pytest.raises(InvalidInputError):
        charge(
            store, 1, mechanism="central", sampling="poisson", **{**common, "delta": float("nan")}
        )
    assert ledger(store) == []


def test_ledger_survives_reopen(tmp_path: Path) -> None:
    sql = SqlStore.open(tmp_path / "state")
    charge(
        sql,
        3,
        mechanism="local",
        noise_multiplier=2.0,
        sampling="poisson",
        sampling_rate=1.0,
        clip_norm=0.5,
        epsilon_rdp=3.0,
        delta=1e-6,
    )
    sql.close()
    sql = SqlStore.open(tmp_path / "state")
    try:
        assert [(r.round_id, r.mechanism) for r in ledger(sql)] == [(3, "local")]
    finally:
        sql.close()


def test_adaptive_clipping_columns_round_trip(store: SqlStore) -> None:
    row = charge(
        store,
        1,
        mechanism="central",
        noise_multiplier=1.0,
        sampling="poisson",
        sampling_rate=0.5,
        clip_norm=0.8,
        epsilon_rdp=0.5,
        delta=1e-5,
        unclipped_fraction=-0.25,  # a noised fraction may leave [0, 1]
        next_clip_norm=0.9,
    )
    assert ledger(store) == [row]
    assert (row.clip_norm, row.unclipped_fraction, row.next_clip_norm) == (0.8, -0.25, 0.9)
    with pytest.raises(InvalidInputError, match="next_clip_norm"):
        charge(
            store,
            2,
            mechanism="central",
            noise_multiplier=1.0,
            sampling="poisson",
            sampling_rate=0.5,
            clip_norm=0.8,
            epsilon_rdp=0.5,
            delta=1e-5,
            next_clip_norm=float("inf"),
        )


def test_a_schema_3_ledger_gains_the_adaptive_columns(tmp_path: Path) -> None:
    import sqlite3

    sql = SqlStore.open(tmp_path / "state")
    charge(
        sql,
        1,
        mechanism="central",
        noise_multiplier=1.0,
        sampling="poisson",
        sampling_rate=0.5,
        clip_norm=1.0,
        epsilon_rdp=0.5,
        delta=1e-5,
    )
    sql.close()
    # make it the database a schema-3 flctl wrote: no adaptive columns
    conn = sqlite3.connect(tmp_path / "state" / "state.db")
    with conn:
        conn.execute("ALTER TABLE dp_ledger DROP COLUMN unclipped_fraction")
        conn.execute("ALTER TABLE dp_ledger DROP COLUMN next_clip_norm")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()
    with SqlStore.open(tmp_path / "state") as sql:
        (old,) = ledger(sql)
        assert (old.round_id, old.epsilon_rdp, old.next_clip_norm) == (1, 0.5, None)
        charge(
            sql,
            2,
            mechanism="central",
            noise_multiplier=1.0,
            sampling="poisson",
            sampling_rate=0.5,
            clip_norm=1.0,
            epsilon_rdp=0.7,
            delta=1e-5,
            next_clip_norm=1.1,
        )
        assert [r.next_clip_norm for r in ledger(sql)] == [None, 1.1]
    conn = sqlite3.connect(tmp_path / "state" / "state.db")
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SqlStore.SCHEMA_VERSION),) == ("9",)
    finally:
        conn.close()


def test_a_schema_3_database_without_a_ledger_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    SqlStore.open(tmp_path / "state").close()
    conn = sqlite3.connect(tmp_path / "state" / "state.db")
    with conn:
        conn.execute("DROP TABLE dp_ledger")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()
    with SqlStore.open(tmp_path / "state") as sql:
        assert ledger(sql) == []
