"""Run tracking: events in; the MLflow run and TensorBoard files read back by their own readers."""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flctl.core import Config, Event, load_config
from flctl.core import events as ev
from flctl.core.errors import ConfigError, FlctlError, InvalidInputError
from flctl.observe import HeadModel, RunTracker, export_run, start_tracking, tracking_params
from flctl.store import BlobStore, SqlStore

TRACKED = '[tracking]\nmlflow_uri = "file:./mlruns"\ntensorboard_dir = "runs"\nexperiment = "exp"\n'


def _project(root: Path, text: str = TRACKED) -> Config:
    root.mkdir(parents=True, exist_ok=True)
    (root / "flctl.toml").write_text(text)
    return load_config(root / "flctl.toml")


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """MLflow's own client for reading back (it asks for the file-store opt-in itself)."""

    def read(uri: str) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        return MlflowClient(tracking_uri=uri)

    yield read


class Feed:
    """Events as the coordinator writes them (payload.to_data()), seq and time rising."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker
        self._seq = itertools.count(1)

    def __call__(self, payload: ev.EventPayload, server_round: int) -> None:
        seq = next(self._seq)
        self.tracker(
            Event(
                seq=seq,
                time=1000.0 + seq,
                type=payload.type,
                server_round=server_round,
                data=payload.to_data(),
            )
        )

    def commit(self, server_round: int, metrics: dict[str, float]) -> None:
        self(
            ev.RoundCommitted(
                model_version=server_round + 1,
                metrics=metrics,
                num_clients=2,
                duration_s=1.0,
                aggregate_s=0.1,
                aggregation="whole",
                evaluate_s=None,
            ),
            server_round,
        )


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(s.step, round(s.value, 5)) for s in events.Scalars(tag)]


def test_committed_rounds_settings_and_model_reach_mlflow_and_tensorboard(
    tmp_path: Path, reader: Any
) -> None:
    config = _project(tmp_path / "proj", TRACKED + "[strategy]\nname = 'fedprox'\nmu = 0.1\n")
    tracker = start_tracking(config, "serve", {"simulate.clients": 4})
    assert tracker is not None
    feed = Feed(tracker)
    started = ev.RoundStarted(base_version=1, selected=("c1",), deadline_unix=9.0, min_clients=1)
    feed(started, 1)  # not a committed round: ignored
    feed.commit(1, {"loss": 0.9, "accuracy": 0.5})
    feed(ev.RoundFailed(reason="quorum", duration_s=1.0), 2)  # no metrics for a failed round
    feed.commit(3, {"loss": 0.4, "accuracy": 0.75, "odd key!": 1.0})
    blob = tmp_path / "blob"
    blob.write_bytes(b"safetensors bytes")
    tracker.finish(model=HeadModel(version=4, digest="ab" * 32, path=blob))
    assert tracker.failures == 0 and tracker.rounds == 2

    where = tracker.destinations
    assert where["mlflow"]["uri"] == (tmp_path / "proj" / "mlruns").as_uri()
    client = reader(where["mlflow"]["uri"])
    run_id = where["mlflow"]["run_id"]
    history = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value, m.timestamp) for m in history] == [
        (1, 0.5, 1002000),
        (3, 0.75, 1004000),
    ]
    assert [m.step for m in client.get_metric_history(run_id, "odd key_")] == [3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("flctl-project-serve-")
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    params = run.data.params
    assert params["strategy.name"] == "fedprox" and params["strategy.mu"] == "0.1"
    assert params["privacy.mode"] == "off" and params["rounds.min_clients"] == "2"
    assert params["simulate.clients"] == "4"
    assert run.data.tags["flctl.command"] == "serve" and run.data.tags["flctl.model_version"] == "4"
    [artifact] = client.list_artifacts(run_id)
    assert artifact.path == "model.safetensors"
    local = client.download_artifacts(run_id, "model.safetensors", str(tmp_path / "down"))
    assert Path(local).read_bytes() == b"safetensors bytes"

    run_dir = Path(where["tensorboard"]["dir"])
    assert run_dir.parent == tmp_path / "proj" / "runs"
    assert _scalars(run_dir, "loss") == [(1, 0.9), (3, 0.4)]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    [text] = events.Tensors("parameters")
    assert b"| strategy.mu | 0.1 |" in text.tensor_proto.string_val[0]


def test_the_parameters_carry_the_privacy_settings_once_privacy_is_on(tmp_path: Path) -> None:
    off = tracking_params(_project(tmp_path / "off", ""))
    assert off["privacy.mode"] == "off" and "privacy.noise_multiplier" not in off
    private = tracking_params(
        _project(
            tmp_path / "on",
            '[privacy]\nmode = "central"\nclip_norm = 0.5\nnoise_multiplier = 1.2\n'
            "epsilon_budget = 8.0\n[task]\nlr = 0.05\nfast = true\n",
        )
    )
    assert private["privacy.mode"] == "central" and private["privacy.clip_norm"] == "0.5"
    assert private["privacy.noise_multiplier"] == "1.2"
    assert private["privacy.epsilon_budget"] == "8.0"
    assert private["task.lr"] == "0.05" and private["task.fast"] == "true"


def test_relative_destinations_resolve_against_the_project_folder(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    assert _project(root, "").mlflow_uri == "" and _project(root, "").tensorboard_path is None
    assert start_tracking(_project(root, ""), "serve") is None  # nothing asked, nothing opened
    for given in ("file:./mlruns", "file:mlruns", "mlruns", "./mlruns"):
        config = _project(root, f'[tracking]\nmlflow_uri = "{given}"\n')
        assert config.mlflow_uri == (root / "mlruns").as_uri(), given
    absolute = _project(root, f'[tracking]\nmlflow_uri = "file://{tmp_path}/elsewhere"\n')
    assert absolute.mlflow_uri == (tmp_path / "elsewhere").as_uri()
    server = _project(root, '[tracking]\nmlflow_uri = "http://127.0.0.1:5000"\n')
    assert server.mlflow_uri == "http://127.0.0.1:5000"
    tensorboard = _project(root, '[tracking]\ntensorboard_dir = "../tb"\n')
    assert tensorboard.tensorboard_path == tmp_path / "tb"
    with pytest.raises(ConfigError, match="`tracking.experiment` must name"):
        _project(root, '[tracking]\nmlflow_uri = "mlruns"\nexperiment = " "\n')


@pytest.mark.parametrize(
    ("tracking", "needle"),
    [
        ('mlflow_uri = "ftp://host/runs"', "[tracking] mlflow_uri: MLflow cannot track to"),
        ('mlflow_uri = "sqlite:///runs.db"', "a database store needs the full mlflow package"),
        ('mlflow_uri = "file:./taken/mlruns"', "[tracking] mlflow_uri: cannot track to MLflow"),
        ('tensorboard_dir = "taken/runs"', "[tracking] tensorboard_dir: cannot write"),
    ],
)
def test_a_destination_that_cannot_be_written_is_refused_at_start(
    tmp_path: Path, tracking: str, needle: str
) -> None:
    root = tmp_path / "proj"
    config = _project(root, f"[tracking]\n{tracking}\n")
    (root / "taken").write_text("a file where a folder should be")
    with pytest.raises(ConfigError) as refused:
        start_tracking(config, "serve")
    assert needle in refused.value.message
    assert sorted(p.name for p in root.iterdir()) == ["flctl.toml", "taken"]  # nothing made


def test_a_later_destination_refused_ends_the_run_already_opened_as_failed(
    tmp_path: Path, reader: Any
) -> None:
    root = tmp_path / "proj"
    config = _project(root, '[tracking]\nmlflow_uri = "mlruns"\ntensorboard_dir = "taken/tb"\n')
    (root / "taken").write_text("a file")
    with pytest.raises(ConfigError, match="tensorboard_dir"):
        start_tracking(config, "simulate")
    client = reader(config.mlflow_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "flctl"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"


def test_a_write_that_fails_during_the_run_is_a_warning_and_the_run_goes_on(
    tmp_path: Path, reader: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = _project(tmp_path / "proj")
    tracker = start_tracking(config, "serve")
    assert tracker is not None
    feed = Feed(tracker)
    feed.commit(1, {"loss": 0.9})
    where = tracker.destinations
    # the MLflow run disappears under the tracker (someone cleaned the store up)
    client = reader(where["mlflow"]["uri"])
    run = client.get_run(where["mlflow"]["run_id"])
    _wait_for(lambda: len(client.get_metric_history(run.info.run_id, "loss")) == 1)
    shutil.rmtree(Path(run.info.artifact_uri.removeprefix("file://")).parent)
    with caplog.at_level(logging.WARNING, logger="flctl.tracking"):
        feed.commit(2, {"loss": 0.5})
        # a malformed event is no round to log (and a subscriber never raises)
        tracker(
            Event(seq=9, time=9.0, type=ev.ROUND_COMMITTED, server_round=4, data={"metrics": 1})
        )
        tracker.log_round(5, {"loss": float("nan"), "note": "text"})  # nothing finite: skipped
        tracker.finish(config)  # the project has no state store: no model, a warning
    assert tracker.failures >= 2  # round 2 and the end of the run, in MLflow
    assert tracker.rounds == 2
    assert "MLflow could not record round 2" in caplog.text
    assert "no final model to log" in caplog.text
    assert _scalars(Path(where["tensorboard"]["dir"]), "loss") == [(1, 0.9), (2, 0.5)]


def _wait_for(check: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _recorded_run(config: Config) -> bytes:
    """A state store as a run leaves it: rounds 1 and 3 committed, 2 failed; the head's blob."""
    blobs = BlobStore(config.blobs_path)
    store = SqlStore.open(config.state_path)
    try:
        store.add_model(digest=blobs.put_bytes(b"initial"), kind="initial", set_head=True)
        for server_round, loss in ((1, 0.8), (2, None), (3, 0.3)):
            [created] = store.create_rounds(1, {})
            assert created == server_round
            store.set_round_status(server_round, "training", base_version=1, selected=["c1"])
            if loss is None:
                store.set_round_status(server_round, "failed", reason="quorum")
                continue
            digest = blobs.put_bytes(f"model of round {server_round}".encode())
            store.commit_round(server_round, digest=digest, metrics={"loss": loss}, num_clients=1)
    finally:
        store.close()
    return b"model of round 3"


def test_export_run_writes_a_recorded_run_from_the_store(tmp_path: Path, reader: Any) -> None:
    config = _project(tmp_path / "proj", "")
    head = _recorded_run(config)
    report = export_run(
        config,
        mlflow_uri=(tmp_path / "exported").as_uri(),
        tensorboard_dir=tmp_path / "tb",
        experiment="past",
    )
    assert (report.rounds, report.last_round, report.model_version) == (2, 3, 3)
    document = report.to_dict()
    assert set(document) == {"rounds", "last_round", "model_version", "mlflow", "tensorboard"}
    client = reader((tmp_path / "exported").as_uri())
    run_id = document["mlflow"]["run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 0.8),
        (3, 0.3),
    ]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "fedavg"
    assert run.data.tags["flctl.command"] == "export-metrics"
    assert client.get_experiment(run.info.experiment_id).name == "past"
    local = client.download_artifacts(run_id, "model.safetensors", str(tmp_path / "down"))
    assert Path(local).read_bytes() == head
    assert _scalars(Path(document["tensorboard"]["dir"]), "loss") == [(1, 0.8), (3, 0.3)]


def test_export_run_refuses_before_writing_anything(tmp_path: Path) -> None:
    config = _project(tmp_path / "proj", "")
    with pytest.raises(InvalidInputError, match="nothing to export to"):
        export_run(config)
    with pytest.raises(FlctlError):  # no state store yet
        export_run(config, tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
