"""Run tracking as a user sets it up: ``[tracking]`` on a simulation, then ``export-metrics``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import flctl, one_json

pytestmark = pytest.mark.timeout(300)

TRACKING = """
[tracking]
mlflow_uri = "file:./mlruns"
tensorboard_dir = "runs"
experiment = "e2e"
"""


def _scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(run_dir)
    events.Reload()
    return [(s.step, round(s.value, 4)) for s in events.Scalars(tag)]


def test_a_tracked_simulation_and_its_export_read_back_with_mlflow_and_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flctl("init", "tracked", cwd=tmp_path, check=True)
    proj = tmp_path / "tracked"
    toml = proj / "flctl.toml"
    toml.write_text(toml.read_text() + TRACKING)
    result = flctl(
        "simulate", "--clients", "2", "--rounds", "2", "--workers", "1", "--json",
        cwd=proj, check=True,
    )  # fmt: skip
    report = one_json(result.stdout)
    assert [r["status"] for r in report["rounds"]] == ["committed", "committed"]
    accuracy = [(r["id"], round(r["metrics"]["accuracy"], 4)) for r in report["rounds"]]
    tracked = report["tracking"]
    assert tracked["mlflow"]["uri"] == (proj / "mlruns").as_uri()

    # MLflow's own client reads the run back (reading a file store asks for MLflow's opt-in;
    # flctl gave it for itself in the subprocess)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=tracked["mlflow"]["uri"])
    run_id = tracked["mlflow"]["run_id"]
    history = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, round(m.value, 4)) for m in history] == accuracy
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["simulate.clients"] == "2"
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    model = client.download_artifacts(run_id, "model.safetensors", str(tmp_path / "down"))
    assert hashlib.sha256(Path(model).read_bytes()).hexdigest() == report["head_digest"]
    assert _scalars(tracked["tensorboard"]["dir"], "accuracy") == accuracy

    # the same run exported afterwards from the state store, into TensorBoard
    exported = flctl("export-metrics", "--tensorboard", "exported", "--json", cwd=proj, check=True)
    document = one_json(exported.stdout)
    assert (document["rounds"], document["last_round"]) == (2, 2)
    run_dir = document["tensorboard"]["dir"]
    assert Path(run_dir).parent == proj / "exported"
    assert _scalars(run_dir, "accuracy") == accuracy
