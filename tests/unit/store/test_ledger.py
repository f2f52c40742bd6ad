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
