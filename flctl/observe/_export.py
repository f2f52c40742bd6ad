"""``flctl export-metrics``: a past run, from the state store, to MLflow and/or TensorBoard.

The same run :class:`~flctl.observe.RunTracker` writes live: every committed round's metrics at
step = the round (the rounds table keeps the metrics of each ``round.committed`` event, written
in the same transaction, with its end time), the project's settings as parameters and the head
model as an artifact. It reads the store read-only, so it works with or without a coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.core.config import Config
from flctl.core.errors import ConfigError
from flctl.observe._sinks import FAILED, FINISHED, HeadModel, Sink, close_all, one_line, open_sinks
from flctl.observe._tracking import head_model, run_name, run_tags, tracking_params

__all__ = ["ExportReport", "export_run"]

#: Rounds read from the store at a time.
_PAGE = 1000


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_run` exported, and where.

    Attributes:
        rounds: Committed rounds whose metrics were exported.
        last_round: The last of them, or None.
        model_version: The head model logged as an artifact (MLflow), or None.
        destinations: ``{"mlflow": {uri, experiment, experiment_id, run_id}, "tensorboard":
            {dir}}``, for those given.
    """

    rounds: int
    last_round: int | None
    model_version: int | None
    destinations: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As one JSON document."""
        return {
            "rounds": self.rounds,
            "last_round": self.last_round,
            "model_version": self.model_version,
            **self.destinations,
        }


def _committed_rounds(
    config: Config,
) -> tuple[list[tuple[int, dict[str, float], float]], HeadModel | None]:
    """Every committed round (id, metrics, end time), oldest first, and the head model."""
    from flctl.store import open_store, require_state

    require_state(config)
    store = open_store(config, read_only=True)
    rounds: list[tuple[int, dict[str, float], float]] = []
    try:
        before = 0
        while page := store.list_rounds(limit=_PAGE, before=before):
            rounds[:0] = [
                (r.id, dict(r.metrics), r.ended or r.created)
                for r in page
                if r.status == "committed"
            ]
            before = page[0].id
            if len(page) < _PAGE:
                break
    finally:
        store.close()
    return rounds, head_model(config)


def export_run(
    config: Config,
    *,
    mlflow_uri: str = "",
    tensorboard_dir: Path | None = None,
    experiment: str = "",
) -> ExportReport:
    """Export the project's recorded run: round metrics, settings, head model.

    Args:
        config: The project (its state store is read, never written).
        mlflow_uri: An absolute MLflow tracking URI, or "" for none.
        tensorboard_dir: The folder of TensorBoard runs (the export gets a folder of its own
            in it), or None.
        experiment: The MLflow experiment (default ``[tracking] experiment``).

    Returns:
        What was exported and where.

    Raises:
        InvalidInputError: Neither destination given.
        FlctlError: The store cannot be read (no state yet, lost, damaged).
        ConfigError: A destination cannot be written (at the start, or part-way: the run is
            then ended as failed).
    """
    from flctl.core.errors import InvalidInputError

    if not mlflow_uri and tensorboard_dir is None:
        raise InvalidInputError(
            "nothing to export to", hint="give --mlflow URI, --tensorboard DIR, or both"
        )
    rounds, model = _committed_rounds(config)  # the store first: a bad one writes nothing
    if model is not None and not model.path.is_file():
        model = None
    sinks = open_sinks(
        mlflow_uri=mlflow_uri,
        tensorboard_dir=tensorboard_dir,
        experiment=experiment.strip() or config.tracking.experiment,
        run_name=run_name(config, "export"),
        tags=run_tags(config, "export-metrics"),
        origin={"mlflow": "--mlflow", "tensorboard": "--tensorboard"},
    )
    params = tracking_params(config)
    for sink in sinks:
        _write(sinks, sink, params, rounds, model)
    for sink in sinks:
        _close(sinks, sink)
    return ExportReport(
        rounds=len(rounds),
        last_round=rounds[-1][0] if rounds else None,
        model_version=model.version if model is not None and mlflow_uri else None,
        destinations={sink.name.lower(): sink.describe() for sink in sinks},
    )


def _write(
    sinks: list[Sink],
    sink: Sink,
    params: dict[str, str],
    rounds: list[tuple[int, dict[str, float], float]],
    model: HeadModel | None,
) -> None:
    """Write the whole run to ``sink``; on a failure end every run as failed and say why."""
    try:
        sink.log_params(params)
        for server_round, metrics, ended in rounds:
            sink.log_round(server_round, metrics, ended)
        if model is not None:
            sink.log_model(model)
    except Exception as exc:  # mlflow's, requests' and OS errors: the export stops here
        close_all(sinks, FAILED)
        raise ConfigError(
            f"exporting to {sink.name} at {_where(sink)} failed: {one_line(exc)}",
            hint="the run there is marked failed; fix the destination and export again",
        ) from None


def _close(sinks: list[Sink], sink: Sink) -> None:
    try:
        sink.close(FINISHED)
    except Exception as exc:  # as in _write
        close_all(sinks, FAILED)
        raise ConfigError(
            f"exporting to {sink.name} at {_where(sink)} failed: {one_line(exc)}"
        ) from None


def _where(sink: Sink) -> str:
    where = sink.describe()
    return where.get("uri") or where.get("dir") or "?"
