"""Schema 7: each accepted update's anomaly scores, and what the outlier rule made of it."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from flctl.core.errors import InvalidInputError, NotFoundError
from flctl.store import SqlStore

SCORES = {"cosine": None, "l2": 2.5, "median_distance": None}


def _accepted(store: SqlStore, client_id: str = "c1", **extra: object) -> int:
    record = store.add_update(
        server_round=1,
        client_id=client_id,
        task_id=f"t-{client_id}",
        status="accepted",
        digest="ab" * 32,
        size=10,
        num_examples=5,
        **extra,  # type: ignore[arg-type]
    )
    return record.id


def test_an_update_starts_unscored(store: SqlStore) -> None:
    update_id = _accepted(store)
    (record,) = store.updates_for_round(1)
    assert record.id == update_id
    assert (record.scores, record.outlier, record.is_excluded) == (None, "", False)


def test_scores_recorded_with_the_update_and_after_it(store: SqlStore) -> None:
    first = store.add_update(
        server_round=1, client_id="c1", task_id="t1", status="accepted", scores=SCORES
    )
    assert first.scores == SCORES
    second = _accepted(store, "c2")
    scored = store.set_update_scores(second, {"l2": 1, "cosine": -0.5, "median_distance": 3.0})
    assert scored.scores == {"l2": 1.0, "cosine": -0.5, "median_distance": 3.0}
    assert (scored.outlier, scored.is_excluded) == ("", False)
    # the rule's verdict later, keeping the scores
    why = "cosine -0.5 (z -6.00 < -3.5)"
    dropped = store.set_update_scores(second, outlier=why, excluded=True)
    assert (dropped.scores, dropped.outlier, dropped.is_excluded) == (scored.scores, why, True)
    flagged = store.set_update_scores(first.id, SCORES, outlier="l2 2.5 (z 4.00 > 3.5)")
    assert (flagged.outlier, flagged.is_excluded) == ("l2 2.5 (z 4.00 > 3.5)", False)
    by_id = {u.id: u for u in store.updates_for_round(1, status="accepted")}
    assert by_id[second] == dropped and by_id[first.id] == flagged
    # a later call sets all three: the verdict can be taken back
    cleared = store.set_update_scores(second)
    assert (cleared.scores, cleared.outlier, cleared.is_excluded) == (scored.scores, "", False)


def test_only_an_accepted_update_is_scored(store: SqlStore) -> None:
    rejected = store.add_update(
        server_round=1, client_id="c1", task_id="t1", status="rejected", reason="late"
    )
    with pytest.raises(InvalidInputError, match="only an accepted update"):
        store.set_update_scores(rejected.id, SCORES)
    with pytest.raises(InvalidInputError, match="only an accepted update"):
        store.add_update(
            server_round=1, client_id="c1", task_id="t1", status="rejected", scores=SCORES
        )
    with pytest.raises(NotFoundError, match="no update 99"):
        store.set_update_scores(99, SCORES)


@pytest.mark.parametrize(
    ("scores", "needle"),
    [
        ({"l2": math.nan}, "finite"),
        ({"l2": math.inf}, "finite"),
        ({"l2": "1.0"}, "must be a number"),
        ({"l2": True}, "must be a number"),
    ],
)
def test_bad_scores_are_refused(store: SqlStore, scores: dict[str, object], needle: str) -> None:
    update_id = _accepted(store)
    with pytest.raises(InvalidInputError, match=needle):
        store.set_update_scores(update_id, scores)  # type: ignore[arg-type]
    assert store.updates_for_round(1)[0].scores is None


def test_an_exclusion_needs_its_reason(store: SqlStore) -> None:
    update_id = _accepted(store)
    with pytest.raises(InvalidInputError, match="reason"):
        store.set_update_scores(update_id, SCORES, excluded=True)


def test_a_version_6_database_is_migrated(tmp_path: Path) -> None:
    with SqlStore.open(tmp_path) as store:
        store.add_model(digest="1" * 64, kind="initial", set_head=True)
        (server_round,) = store.create_rounds(1)
        _accepted(store)
    conn = sqlite3.connect(tmp_path / "state.db")
    with conn:
        for column in ("scores", "outlier", "excluded"):
            conn.execute(f"ALTER TABLE updates DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    conn.close()
    with SqlStore.open(tmp_path) as store:
        assert store.migrated_from == 6 and store.backup_path is not None
        (old,) = store.updates_for_round(server_round)
        assert (old.scores, old.outlier, old.is_excluded) == (None, "", False)
        store.set_update_scores(old.id, SCORES, outlier="l2 2.5 (z 4.00 > 3.5)", excluded=True)
        new = store.add_update(
            server_round=server_round, client_id="c2", task_id="t2", status="accepted"
        )
        assert (new.scores, new.outlier, new.is_excluded) == (None, "", False)
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == ("9",) == (str(SqlStore.SCHEMA_VERSION),)
        rows = conn.execute("SELECT scores, outlier, excluded FROM updates ORDER BY id").fetchall()
        assert json.loads(rows[0][0]) == SCORES and rows[0][1:] == ("l2 2.5 (z 4.00 > 3.5)", 1)
        assert rows[1] == (None, "", 0)
    finally:
        conn.close()
    # a read-only open of the migrated database sees the same
    with SqlStore.open(tmp_path, read_only=True) as store:
        assert store.updates_for_round(server_round)[0].is_excluded
