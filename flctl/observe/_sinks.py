"""Where a tracked run goes: an MLflow run, a TensorBoard run folder.

Each sink is opened for one run (:func:`open_sinks`, which turns any failure into a
:class:`~flctl.core.errors.ConfigError` naming the setting), then takes the run's parameters,
each committed round's metrics (step = the round) and the final model, and is closed with the
run's status. mlflow and tensorboard are imported here, inside functions: ``flctl --help`` and
every command that does not track load neither. This is the one home of both libraries.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from flctl.core.errors import ConfigError

__all__ = [
    "FAILED",
    "FINISHED",
    "KILLED",
    "MODEL_ARTIFACT",
    "HeadModel",
    "Sink",
    "close_all",
    "metric_key",
    "one_line",
    "open_sinks",
]

#: How a run ended, in MLflow's words (``RunStatus``).
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
#: The name the head model's safetensors blob gets among the MLflow run's artifacts.
MODEL_ARTIFACT = "model.safetensors"

#: What MLflow allows in a metric or parameter name (its own rule, for POSIX systems).
_UNSAFE = re.compile(r"[^\w.\- :]")
#: Tracking URI schemes MLflow's client reaches without more packages (a database URI such as
#: ``sqlite:///`` needs the full ``mlflow`` package: alembic).
_SCHEMES = ("file", "http", "https", "databricks")
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
#: MLflow's batch limits (``mlflow.utils.validation``).
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000
_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
_FILE_STORE_LOCK = threading.Lock()


@dataclass(frozen=True)
class HeadModel:
    """The model a run ends with: the head version and its safetensors blob.

    Attributes:
        version: The head's model version.
        digest: Its SHA-256 (the blob's name).
        path: The blob in the project's blob store.
    """

    version: int
    digest: str
    path: Path


class Sink(Protocol):
    """One destination of a tracked run (an MLflow run, a TensorBoard run folder)."""

    #: "MLflow" or "TensorBoard", as messages name it.
    name: str

    def describe(self) -> dict[str, str]:
        """Where the run is (the URI, the run's id, the folder), for summaries and JSON."""
        ...

    def log_params(self, params: Mapping[str, str]) -> None:
        """Record the run's parameters (once)."""
        ...

    def log_round(self, server_round: int, metrics: Mapping[str, float], wall_time: float) -> None:
        """Record one committed round's metrics at step ``server_round``."""
        ...

    def log_model(self, model: HeadModel) -> None:
        """Record the model the run ends with."""
        ...

    def close(self, status: str) -> None:
        """End the run as ``status`` (:data:`FINISHED`, :data:`FAILED`, :data:`KILLED`)."""
        ...


def metric_key(name: str) -> str:
    """``name`` as an MLflow and TensorBoard key: other characters become ``_``.

    Slashes stay (TensorBoard groups by them); an empty, ``.`` or ``..`` part becomes ``_``,
    so the key never resolves to another name when MLflow stores it as a file.
    """
    parts = [_UNSAFE.sub("_", part).strip() for part in name.split("/")]
    return "/".join(p if p not in ("", ".", "..") else "_" for p in parts)[:250]


class _MlflowSink:
    """An MLflow run, written with :class:`mlflow.tracking.MlflowClient` (no global state)."""

    name = "MLflow"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Mapping[str, str]) -> None:
        self.uri = uri
        self.experiment = experiment
        self._client = _mlflow_client(uri)
        self.experiment_id = _experiment_id(self._client, experiment)
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id: str = run.info.run_id

    def describe(self) -> dict[str, str]:
        return {
            "uri": self.uri,
            "experiment": self.experiment,
            "experiment_id": str(self.experiment_id),
            "run_id": self.run_id,
        }

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + _PARAMS_PER_BATCH])

    def log_round(self, server_round: int, metrics: Mapping[str, float], wall_time: float) -> None:
        from mlflow.entities import Metric

        stamp = int(wall_time * 1000)
        items = [Metric(metric_key(k), v, stamp, server_round) for k, v in metrics.items()]
        for start in range(0, len(items), _METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[start : start + _METRICS_PER_BATCH])

    def log_model(self, model: HeadModel) -> None:
        # the artifact takes its file's name: give the blob (named by its digest) a real one
        with tempfile.TemporaryDirectory(prefix="flctl-model-") as folder:
            named = Path(folder) / MODEL_ARTIFACT
            try:
                os.link(model.path, named)
            except OSError:  # another file system, or no hard links: copy
                shutil.copyfile(model.path, named)
            self._client.log_artifact(self.run_id, str(named))
        self._client.set_tag(self.run_id, "flctl.model_version", str(model.version))
        self._client.set_tag(self.run_id, "flctl.model_sha256", model.digest)

    def close(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status)


def _mlflow_client(uri: str) -> Any:
    """A client of the tracking store at ``uri`` (a local file store, or a server)."""
    from mlflow.tracking import MlflowClient

    if urlsplit(uri).scheme != "file":
        return MlflowClient(tracking_uri=uri)
    # MLflow 3 keeps its file store in maintenance mode and refuses it unless
    # MLFLOW_ALLOW_FILE_STORE is set; `[tracking] mlflow_uri = "file:..."` is that opt-in.
    # MLflow caches the store per URI, so the variable is needed only while the first client
    # for it is built; it is put back at once (before any coordinator thread runs).
    with _FILE_STORE_LOCK:
        saved = os.environ.get(_FILE_STORE_ENV)
        os.environ[_FILE_STORE_ENV] = "true"
        try:
            return MlflowClient(tracking_uri=uri)
        finally:
            if saved is None:
                del os.environ[_FILE_STORE_ENV]
            else:
                os.environ[_FILE_STORE_ENV] = saved


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (also by a racing process)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(client.create_experiment(name))
        except Exception:  # another process created it first: use theirs
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ValueError(
            f"the experiment {name!r} is deleted: restore it in MLflow, or track into another one"
        )
    return str(found.experiment_id)


class _TensorBoardSink:
    """A TensorBoard run folder: scalars per round, the parameters as a text summary.

    Written with tensorboard's own event-file writer (what ``torch.utils.tensorboard`` uses
    underneath), so neither torch nor TensorFlow is needed.
    """

    name = "TensorBoard"

    def __init__(self, root: Path, run_name: str) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.path = _new_folder(root, run_name)
        self._writer = EventFileWriter(str(self.path))
        self._writer.flush()

    def describe(self) -> dict[str, str]:
        return {"dir": str(self.path)}

    def log_params(self, params: Mapping[str, str]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.plugins.text.summary_v2 import text_pb

        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        table = "| parameter | value |\n|---|---|\n" + rows
        self._writer.add_event(Event(step=0, summary=text_pb("parameters", table)))
        self._writer.flush()

    def log_round(self, server_round: int, metrics: Mapping[str, float], wall_time: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=metric_key(k), simple_value=v) for k, v in metrics.items()]
        summary = Summary(value=values)
        self._writer.add_event(Event(wall_time=wall_time, step=server_round, summary=summary))
        self._writer.flush()

    def log_model(self, model: HeadModel) -> None:
        """TensorBoard keeps no files: the model goes to MLflow only."""

    def close(self, status: str) -> None:
        self._writer.close()


def _new_folder(root: Path, name: str) -> Path:
    """A new, writable folder ``root/name`` (``name-2``, ... when that one exists)."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = root / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        # a folder we may create but not write in (mode 0555 above it is caught by mkdir)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return path
    raise FileExistsError(f"{root / name} and 998 more like it exist")


def open_sinks(
    *,
    mlflow_uri: str,
    tensorboard_dir: Path | None,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    origin: Mapping[str, str],
) -> list[Sink]:
    """Open the run in each destination given (none when both are off).

    Args:
        mlflow_uri: An absolute tracking URI, or "" for no MLflow run.
        tensorboard_dir: The folder of TensorBoard runs, or None.
        experiment: The MLflow experiment (created when missing).
        run_name: The run's name (MLflow) and folder under ``tensorboard_dir``.
        tags: MLflow tags of the run.
        origin: Where each destination was given (``{"mlflow": "--mlflow", ...}``), for errors.

    Raises:
        ConfigError: A destination cannot be written (an unknown URI scheme, a store or folder
            that cannot be created or written, mlflow or tensorboard not installed); the
            destinations opened before it are closed as failed.
    """
    sinks: list[Sink] = []
    try:
        if mlflow_uri:
            sinks.append(_open_mlflow(mlflow_uri, experiment, run_name, tags, origin["mlflow"]))
        if tensorboard_dir is not None:
            sinks.append(_open_tensorboard(tensorboard_dir, run_name, origin["tensorboard"]))
    except BaseException:
        close_all(sinks, FAILED)
        raise
    return sinks


def _open_mlflow(
    uri: str, experiment: str, run_name: str, tags: Mapping[str, str], origin: str
) -> Sink:
    scheme = urlsplit(uri).scheme
    if scheme not in _SCHEMES:
        why = (
            "a database store needs the full mlflow package (alembic), which flctl does not install"
            if scheme.split("+")[0] in _DATABASES
            else f"unknown scheme {scheme!r}"
        )
        raise ConfigError(
            f"{origin}: MLflow cannot track to {uri!r}: {why}",
            hint='use a local store ("file:./mlruns") or a tracking server ("http://host:5000")',
        )
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError as exc:
        raise _not_installed(origin, "mlflow", exc) from None
    try:
        return _MlflowSink(uri, experiment, run_name, tags)
    except Exception as exc:  # mlflow raises its own, requests' and OS errors alike
        raise ConfigError(
            f"{origin}: cannot track to MLflow at {uri}: {one_line(exc)}",
            hint="check the URI, that the folder is writable or the server answers",
        ) from None


def _open_tensorboard(root: Path, run_name: str, origin: str) -> Sink:
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError as exc:
        raise _not_installed(origin, "tensorboard", exc) from None
    try:
        return _TensorBoardSink(root, run_name)
    except OSError as exc:
        raise ConfigError(
            f"{origin}: cannot write TensorBoard runs in {root}: {exc.strerror or exc}",
            hint="give a folder this user can create and write",
        ) from None


def _not_installed(origin: str, package: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"{origin} needs the {package} package, which is not installed ({exc})",
        hint="pip install 'flctl[tracking]'",
    )


def close_all(sinks: Sequence[Sink], status: str) -> None:
    """Close every sink as ``status``, whatever the others do (for runs that already failed)."""
    for sink in sinks:
        with contextlib.suppress(Exception):  # the run already failed: this is best effort
            sink.close(status)


def one_line(exc: BaseException) -> str:
    """An exception in one line, short enough for a log line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
