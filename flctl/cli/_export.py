"""``flctl export-metrics``: a past run from the state store, to MLflow and/or TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flctl.cli._options import ConfigOpt, JsonOpt
from flctl.cli._output import Output, command

__all__ = ["export_metrics_command"]


@command()
def export_metrics_command(
    mlflow: Annotated[
        str,
        typer.Option(
            "--mlflow",
            metavar="URI",
            help="An MLflow tracking URI: a local store (file:./mlruns, relative to here) or a "
            "server (http://host:5000).",
        ),
    ] = "",
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            "--tensorboard",
            metavar="DIR",
            help="A folder of TensorBoard runs; the export gets a folder of its own in it.",
        ),
    ] = None,
    experiment: Annotated[
        str,
        typer.Option(metavar="NAME", help="The MLflow experiment (default [tracking] experiment)."),
    ] = "",
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Export a past run's metrics to MLflow or TensorBoard.

    Every committed round's metrics (step = the round), the project's strategy, privacy and
    round settings as parameters, and the head model as an MLflow artifact, read from the
    state store: with or without a running coordinator.
    """
    from flctl.cli._common import load_project
    from flctl.core.config import resolve_tracking_uri
    from flctl.observe import export_run

    config = load_project(config_path)
    report = export_run(
        config,
        mlflow_uri=resolve_tracking_uri(mlflow, Path.cwd()),
        tensorboard_dir=None if tensorboard is None else tensorboard.resolve(),
        experiment=experiment,
    )
    out = Output(json_mode=json_output)
    if json_output:
        out.json(report.to_dict())
        return
    model = f" and model version {report.model_version}" if report.model_version is not None else ""
    where = []
    if "mlflow" in report.destinations:
        mlflow_run = report.destinations["mlflow"]
        where.append(f"MLflow run {mlflow_run['run_id']} at {mlflow_run['uri']}")
    if "tensorboard" in report.destinations:
        where.append(f"TensorBoard {report.destinations['tensorboard']['dir']}")
    out.line(f"exported {report.rounds} committed round(s){model} to {' and '.join(where)}")
    if not report.rounds:
        out.note("the store holds no committed round yet")
