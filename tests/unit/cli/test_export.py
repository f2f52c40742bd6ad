"""``flctl export-metrics``: its summary, its one JSON document, and bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from flctl.cli import app
from flctl.store import BlobStore, SqlStore

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose store holds one committed round (model version 2, the head)."""
    (tmp_path / "flctl.toml").write_text("")
    blobs = BlobStore(tmp_path / ".flctl" / "blobs")
    store = SqlStore.open(tmp_path / ".flctl")
    try:
        store.add_model(digest=blobs.put_bytes(b"initial"), kind="initial", set_head=True)
        [server_round] = store.create_rounds(1, {})
        store.set_round_status(server_round, "training", base_version=1, selected=["c1"])
        digest = blobs.put_bytes(b"round one")
        store.commit_round(server_round, digest=digest, metrics={"loss": 0.25}, num_clients=1)
    finally:
        store.close()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_summary_says_what_went_where(project: Path) -> None:
    result = runner.invoke(app, ["export-metrics", "--tensorboard", "tb", "--mlflow", "file:ml"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith("exported 1 committed round(s) and model version 2 to MLflow run ")
    assert f"at {(project / 'ml').as_uri()} and TensorBoard {project / 'tb'}/" in line


def test_json_is_one_document_naming_each_destination(project: Path) -> None:
    result = runner.invoke(app, ["export-metrics", "--tensorboard", "tb", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["rounds"] == 1 and document["model_version"] is None  # no MLflow: no model
    events = EventAccumulator(document["tensorboard"]["dir"])
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 0.25)]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([], 40, "nothing to export to"),
        (["--mlflow", "ftp://host/runs"], 10, "--mlflow: MLflow cannot track to 'ftp://host/runs'"),
        (["--tensorboard", "flctl.toml/tb"], 10, "--tensorboard: cannot write TensorBoard runs"),
    ],
)
def test_bad_destinations_are_refused_with_their_exit_code(
    project: Path, args: list[str], code: int, needle: str
) -> None:
    result = runner.invoke(app, ["export-metrics", *args, "--json"])
    assert result.exit_code == code, result.output
    assert needle in json.loads(result.stdout)["error"]["message"]
