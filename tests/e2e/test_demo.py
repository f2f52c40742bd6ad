"""`flctl demo` as the README runs it (fewer rounds to keep the suite lean)."""

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
