"""`flctl demo` as the README runs it (fewer rounds to keep the suite lean)."""

import re
from pathlib import Path

import pytest

from .conftest import flctl, one_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_demo_json_three_rounds(tmp_path: Path) -> None:
    result = flctl("demo", "--json", "--rounds", "3", "--dir", "demo", cwd=tmp_path, timeout=360)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = one_json(result.stdout)
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    for row in doc["rounds"]:
        assert row["status"] == "committed"
        assert row["num_clients"] == 3
        assert set(row["metrics"]) >= {"accuracy", "loss"}
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
        assert row["duration_s"] > 0
    assert doc["model_version"] == 4
    state = Path(doc["state_dir"])
    assert state.is_absolute() and (state / "state.db").is_file()
    assert not (state / "serve.json").exists(), "the demo's coordinator should have stopped"
    # the project is kept for inspection, and models ls reads its store
    ls = flctl("models", "ls", "--json", cwd=tmp_path / "demo", check=True)
    models = one_json(ls.stdout)
    assert models["head"] == 4 and [m["version"] for m in models["models"]] == [4, 3, 2, 1]


def test_demo_piped_prints_the_story_not_every_heartbeat(tmp_path: Path) -> None:
    result = flctl("demo", "--rounds", "2", "--dir", "demo", cwd=tmp_path, timeout=360)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    stamped = [line.split(" ", 1)[1] for line in lines if re.match(r"\d\d:\d\d:\d\d ", line)]
    # no heartbeat-only lines: a client's state, each task sent
    heartbeats = re.compile(r"client c\d (idle|downloading|training|uploading)\b|task sent")
    assert not [line for line in stamped if heartbeats.search(line)], result.stdout
    # while the clients start, each says so, then joins
    for client in ("c1", "c2", "c3"):
        starting = next(
            i for i, t in enumerate(stamped) if t.startswith(f"client {client} starting")
        )
        joined = stamped.index(f"client {client} joined")
        assert starting < joined
    # the rounds' story is there, in order
    story = [
        "round 1 started: 3 clients selected",
        "round 1: update from c1 accepted",
        "model v2 created",
        "round 1 committed: 3 clients",
        "round 2 started: 3 clients selected",
        "model v3 created",
        "round 2 committed: 3 clients",
    ]
    at = [next(i for i, t in enumerate(stamped) if t.startswith(s)) for s in story]
    assert at == sorted(at), result.stdout
    assert "round 2: committed" in result.stdout  # the summary
    assert len(lines) < 60, result.stdout
