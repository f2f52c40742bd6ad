"""Byzantine detection in the CLI: each update's anomaly scores and outlier marks.

The scores are written into the store directly, as the round engine records them; ``round
status`` reads them from the coordinator's Status reply, built here from that store by the
coordinator's own conversion (the Admin service's, tests/integration/test_outliers.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flctl.cli import _common, _output, app
from flctl.store import SqlStore
from flctl.transport.grpc import pb, update_info

runner = CliRunner()

EXCLUDED = "l2 41.2 (z 12.31 > 3.5)"
FLAGGED = "cosine -0.2 (z -4.10 < -3.5)"


def _round(store: SqlStore) -> int:
    """Round 1, committed as version 2: four accepted updates (one excluded, one flagged)."""
    (server_round,) = store.create_rounds(1)
    store.set_round_status(server_round, "selecting")
    store.set_round_status(
        server_round,
        "training",
        base_version=1,
        selected=["c1", "c2", "c3", "c4", "c5"],
        deadline=1e12,
        tasks={c: f"t-{c}" for c in ("c1", "c2", "c3", "c4", "c5")},
    )
    scores = {
        "c1": {"l2": 1.25, "cosine": None, "median_distance": 0.5},
        "c2": {"l2": 1.5, "cosine": 0.92, "median_distance": 0.25},
        "c3": {"l2": 1.0, "cosine": -0.2, "median_distance": 0.75},
        "c4": {"l2": 41.2, "cosine": -0.99, "median_distance": 40.0},
    }
    for client, values in scores.items():
        update = store.add_update(
            server_round=server_round,
            client_id=client,
            task_id=f"t-{client}",
            status="accepted",
            digest=client[-1] * 64,
            num_examples=100,
            scores=values if client == "c1" else None,
        )
        if client == "c3":
            store.set_update_scores(update.id, values, outlier=FLAGGED)
        elif client == "c4":
            store.set_update_scores(update.id, values, outlier=EXCLUDED, excluded=True)
        elif client == "c2":
            store.set_update_scores(update.id, values)
    store.add_update(
        server_round=server_round, client_id="c5", task_id="t-c5", status="rejected", reason="late"
    )
    store.commit_round(server_round, digest="cd" * 32, metrics={"accuracy": 0.8}, num_clients=3)
    return server_round


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "flctl.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    with SqlStore.open(tmp_path / ".flctl") as store:
        store.add_model(digest="ab" * 32, kind="initial", set_head=True)
        _round(store)
    return tmp_path


def _status_reply(project: Path, *, is_listed: bool = True, left_out: int = 0) -> Any:
    """Round 1 as the coordinator answers, its updates listed (``is_listed``) from the store."""
    info = pb.RoundInfo(server_round=1, status="committed", num_clients=3, model_version=2)
    if is_listed:
        with SqlStore.open(project / ".flctl", read_only=True) as store:
            updates = store.updates_for_round(1)
        info.updates.extend(update_info(u) for u in updates[: len(updates) - left_out])
        info.updates_listed = True
        info.updates_left_out = left_out
    return pb.StatusReply(
        rounds=[info],
        head_version=2,
        connected_clients=0,
        # another machine's folder: nothing is read from this project's
        state_dir="/srv/elsewhere/.flctl",
    )


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch, project: Path) -> list[Any]:
    """Stands in for the running coordinator's Admin.Status answer (the list holds it)."""
    reply = [_status_reply(project)]
    monkeypatch.setattr(_common, "call_admin", lambda config, server, call: reply[0])
    return reply


def test_models_show_json_has_each_contributors_scores(project: Path) -> None:
    result = runner.invoke(app, ["models", "show", "2", "--json"])
    assert result.exit_code == 0, result.output
    contributors = {c["client_id"]: c for c in json.loads(result.stdout)["round"]["contributors"]}
    assert sorted(contributors) == ["c1", "c2", "c3", "c4"]
    assert contributors["c1"]["scores"] == {"l2": 1.25, "cosine": None, "median_distance": 0.5}
    assert (contributors["c1"]["outlier"], contributors["c1"]["excluded"]) == ("", False)
    assert (contributors["c3"]["outlier"], contributors["c3"]["excluded"]) == (FLAGGED, False)
    assert (contributors["c4"]["outlier"], contributors["c4"]["excluded"]) == (EXCLUDED, True)


def test_models_show_marks_flagged_and_excluded_updates(project: Path) -> None:
    result = runner.invoke(app, ["models", "show", "2"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["round"] == "1 committed, 4 contributors, 1 excluded, 1 flagged, 1 rejected"
    assert lines["  c1"] == "100 examples; l2 1.25 cos - med-dist 0.5"
    assert lines["  c2"] == "100 examples; l2 1.5 cos 0.920 med-dist 0.25"
    assert lines["  c3"].endswith(f"; flagged: {FLAGGED}")
    assert lines["  c4"] == f"100 examples; l2 41.2 cos -0.990 med-dist 40; excluded: {EXCLUDED}"


def test_round_status_json_lists_each_rounds_updates(coordinator: list[Any]) -> None:
    result = runner.invoke(app, ["round", "status", "--json"])
    assert result.exit_code == 0, result.output
    (round_doc,) = json.loads(result.stdout)["rounds"]
    updates = {u["client_id"]: u for u in round_doc["updates"]}
    assert list(updates) == ["c1", "c2", "c3", "c4", "c5"]  # in arrival order
    assert updates["c4"] == {
        "client_id": "c4",
        "status": "accepted",
        "reason": "",
        "num_examples": 100,
        "scores": {"l2": 41.2, "cosine": -0.99, "median_distance": 40.0},
        "outlier": EXCLUDED,
        "excluded": True,
    }
    assert updates["c5"]["scores"] is None and updates["c5"]["reason"] == "late"


def test_round_status_on_a_terminal_shows_the_scores(
    coordinator: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_output, "stdout_is_terminal", lambda: True)
    result = runner.invoke(app, ["round", "status"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "updates of round 1 (1 excluded, 1 flagged)" in text
    header = next(line for line in text.splitlines() if "med-dist" in line)
    assert header.split() == ["client", "status", "examples", "l2", "cos", "med-dist", "outlier"]
    row = next(line for line in text.splitlines() if line.strip().startswith("c4"))
    assert row.split()[:6] == ["c4", "accepted", "100", "41.2", "-0.990", "40"]
    assert f"excluded: {EXCLUDED}" in row
    assert f"flagged: {FLAGGED}" in text
    assert "rejected: late" in text


def test_round_status_piped_prints_only_the_rounds_table(coordinator: list[Any]) -> None:
    result = runner.invoke(app, ["round", "status"])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split("\t")[:3] == ["round", "status", "clients"] and len(rows) == 1


def test_round_status_reads_the_updates_from_the_reply_not_the_state_folder(
    coordinator: list[Any], project: Path
) -> None:
    shutil.rmtree(project / ".flctl")
    result = runner.invoke(app, ["round", "status", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["rounds"][0]["updates"]) == 5


def test_round_status_json_has_no_updates_for_a_round_the_reply_does_not_list(
    coordinator: list[Any], project: Path
) -> None:
    coordinator[0] = _status_reply(project, is_listed=False)
    result = runner.invoke(app, ["round", "status", "--json"])
    assert result.exit_code == 0, result.output
    assert "updates" not in json.loads(result.stdout)["rounds"][0]


def test_round_status_says_which_updates_the_reply_left_out(
    coordinator: list[Any], project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator[0] = _status_reply(project, left_out=2)
    result = runner.invoke(app, ["round", "status", "--json"])
    (round_doc,) = json.loads(result.stdout)["rounds"]
    assert [u["client_id"] for u in round_doc["updates"]] == ["c1", "c2", "c3"]
    assert round_doc["updates_left_out"] == 2
    monkeypatch.setattr(_output, "stdout_is_terminal", lambda: True)
    result = runner.invoke(app, ["round", "status"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "round 1: 2 more updates did not fit in the reply" in result.output
    coordinator[0] = _status_reply(project, is_listed=False)
    result = runner.invoke(app, ["round", "status", "--round", "1"], env={"COLUMNS": "160"})
    assert "round 1: updates not listed" in result.output
