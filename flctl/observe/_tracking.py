"""Run tracking: a run's round metrics, settings and final model, to MLflow and TensorBoard.

:func:`start_tracking` opens a run where ``[tracking]`` says (refusing, before anything runs, a
destination it cannot write) and returns a :class:`RunTracker`: an event subscriber
(``coordinator.subscribe(tracker)``) that logs each ``round.committed`` event's metrics at
step = the round. The writes happen on a thread of their own, so a slow or unreachable
tracking server never holds up the coordinator's event loop; a write that fails is a warning
in the log and never fails a round. :meth:`RunTracker.finish` logs the head model and ends the
run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flctl import __version__
from flctl.core import events as ev
from flctl.core.config import Config
from flctl.core.events import Event
from flctl.observe._sinks import (
    FAILED,
    FINISHED,
    KILLED,
    HeadModel,
    Sink,
    one_line,
    open_sinks,
)

__all__ = [
    "RUN_STATUSES",
    "RunTracker",
    "head_model",
    "run_name",
    "run_tags",
    "start_tracking",
    "tracking_params",
]

log = logging.getLogger("flctl.tracking")

#: How :meth:`RunTracker.finish` may end a run: done, failed, interrupted (MLflow's statuses).
RUN_STATUSES = (FINISHED, FAILED, KILLED)
#: How long :meth:`RunTracker.finish` waits for writes still queued (a slow server).
FINISH_TIMEOUT_S = 120.0

_Job = tuple[Sink, str, Callable[[], None]]


def _text(value: object) -> str:
    """A setting as a parameter value: TOML's spelling of booleans, else ``str``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def tracking_params(config: Config) -> dict[str, str]:
    """The run's parameters: the strategy, privacy, round and gate settings and the task's keys.

    ``strategy.name`` and each strategy parameter (``strategy.mu``), ``privacy.mode`` (with
    every ``privacy.*`` key when it is not off: clip norm, noise multiplier, budget, ...),
    every ``rounds.*`` key, ``gate.mode`` and the free-form ``task.*`` keys the clients train
    with; ``project.name`` and ``project.seed``.
    """
    params = {"project.name": config.project.name, "project.seed": _text(config.project.seed)}
    strategy = config.strategy
    params["strategy.name"] = strategy.name
    for key, value in sorted(strategy.params.items()):
        params[f"strategy.{key}"] = _text(value)
    params["strategy.incremental"] = _text(strategy.incremental)
    params["strategy.streaming"] = _text(strategy.streaming)
    params["strategy.exclude_outliers"] = strategy.exclude_outliers
    if strategy.exclude_outliers != "off":
        params["strategy.outlier_threshold"] = _text(strategy.outlier_threshold)
    params["privacy.mode"] = config.privacy.mode
    if config.privacy.mode != "off":
        for key, value in dataclasses.asdict(config.privacy).items():
            params[f"privacy.{key}"] = _text(value)
    for key, value in dataclasses.asdict(config.rounds).items():
        params[f"rounds.{key}"] = _text(value)
    params["gate.mode"] = config.gate.mode
    for key, value in sorted(config.task.items()):
        params[f"task.{key}"] = _text(value)
    return params


def run_name(config: Config, command: str) -> str:
    """A run's name: ``<project>-<command>-<YYYYmmdd-HHMMSS>`` (its TensorBoard folder too)."""
    return f"{config.project.name}-{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def head_model(config: Config) -> HeadModel | None:
    """The project's head model and its blob, read from the state store; None without one.

    Raises:
        FlctlError: The store cannot be opened (none yet, lost, damaged, unreachable).
    """
    from flctl.store import BlobStore, open_store, require_state

    require_state(config)
    store = open_store(config, read_only=True)
    try:
        head = store.head()
    finally:
        store.close()
    if head is None:
        return None
    path = BlobStore.object_path(config.blobs_path, head.digest)
    return HeadModel(head.version, head.digest, path)


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are finite numbers (a committed round's all are)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                out[str(key)] = float(value)
    return out


class RunTracker:
    """One tracked run: an event subscriber that logs each committed round where it goes.

    Made by :func:`start_tracking` (or :meth:`open`), which has already opened the run and
    logged its parameters. Rounds are logged from a thread of its own: the subscriber only
    queues them. A write that fails is logged as a warning and the run goes on.

    Example:
        ::

            tracker = start_tracking(config, "serve")
            if tracker is not None:
                coordinator.subscribe(tracker)  # each round.committed, at step = round
            ...
            tracker.finish(config)  # the head model as an artifact, the run ended
    """

    def __init__(self, sinks: list[Sink]) -> None:
        self._sinks = sinks
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="flctl-tracking", daemon=True)
        self._thread.start()
        self._finished = False
        #: Rounds with metrics handed to the tracker (logged, or warned about).
        self.rounds = 0
        #: Writes that failed (each one a warning in the log).
        self.failures = 0

    @classmethod
    def open(
        cls,
        *,
        mlflow_uri: str = "",
        tensorboard_dir: Path | None = None,
        experiment: str = "flctl",
        run_name: str,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        origin: Mapping[str, str] | None = None,
    ) -> RunTracker:
        """Open a run in MLflow (``mlflow_uri``) and/or TensorBoard and log its parameters.

        Args:
            mlflow_uri: An absolute MLflow tracking URI, or "" for none.
            tensorboard_dir: The folder of TensorBoard runs (this one in ``run_name``), or None.
            experiment: The MLflow experiment, created when missing.
            run_name: The run's name.
            params: Its parameters, logged once.
            tags: MLflow tags of the run.
            origin: Where each destination was set, named in errors (default ``[tracking]``).

        Raises:
            ConfigError: A destination cannot be written (nothing is left open).
        """
        where = origin or {
            "mlflow": "[tracking] mlflow_uri",
            "tensorboard": "[tracking] tensorboard_dir",
        }
        sinks = open_sinks(
            mlflow_uri=mlflow_uri,
            tensorboard_dir=tensorboard_dir,
            experiment=experiment,
            run_name=run_name,
            tags=tags or {},
            origin=where,
        )
        tracker = cls(sinks)
        if params:
            for sink in sinks:
                tracker._submit(sink, "the parameters", functools.partial(sink.log_params, params))
        return tracker

    @property
    def destinations(self) -> dict[str, dict[str, str]]:
        """Where the run is: ``{"mlflow": {uri, experiment, run_id, ...}, "tensorboard": ...}``."""
        return {sink.name.lower(): sink.describe() for sink in self._sinks}

    def __call__(self, event: Event) -> None:
        """The subscriber: queue a ``round.committed`` event's metrics; ignore other events."""
        if event.type == ev.ROUND_COMMITTED:
            metrics = event.data.get("metrics")
            self.log_round(
                event.server_round,
                metrics if isinstance(metrics, Mapping) else {},
                wall_time=event.time,
            )

    def log_round(
        self, server_round: int, metrics: Mapping[str, Any], *, wall_time: float | None = None
    ) -> None:
        """Queue a committed round's metrics, at step ``server_round``.

        Args:
            server_round: The round (the step).
            metrics: Its metrics; values that are not finite numbers are left out (a round
                with none is not logged).
            wall_time: When it committed (Unix time; default now).
        """
        clean = _finite(metrics)
        if self._finished or not clean:
            return
        when = time.time() if wall_time is None else wall_time
        self.rounds += 1
        for sink in self._sinks:
            call = functools.partial(sink.log_round, server_round, clean, when)
            self._submit(sink, f"round {server_round}", call)

    def finish(
        self,
        config: Config | None = None,
        *,
        status: str = FINISHED,
        model: HeadModel | None = None,
        timeout_s: float = FINISH_TIMEOUT_S,
    ) -> None:
        """Log the final model, end the run as ``status`` and wait for the queued writes.

        Never raises for what cannot be written: that is a warning in the log.

        Args:
            config: The project: its head model (read from the state store) is the final model
                when ``model`` is not given.
            status: :data:`FINISHED`, :data:`FAILED` or :data:`KILLED`.
            model: The final model (default: the project's head).
            timeout_s: How long to wait for writes still queued before giving up on them.

        Raises:
            ValueError: ``status`` is none of :data:`RUN_STATUSES`.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, not {status!r}")
        if self._finished:
            return
        self._finished = True
        if model is None and config is not None:
            try:
                model = head_model(config)
            except Exception as exc:  # the run is over either way: say why there is no model
                log.warning("tracking: no final model to log: %s", one_line(exc))
        if model is not None and not model.path.is_file():
            log.warning("tracking: the head model's blob %s is missing: not logged", model.path)
            model = None
        for sink in self._sinks:
            if model is not None:
                call = functools.partial(sink.log_model, model)
                self._submit(sink, f"model version {model.version}", call)
            self._submit(sink, "the end of the run", functools.partial(sink.close, status))
        self._jobs.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning(
                "tracking: gave up after %.0f s waiting for %s to take the run's last writes",
                timeout_s,
                " and ".join(sink.name for sink in self._sinks),
            )

    def _submit(self, sink: Sink, what: str, call: Callable[[], None]) -> None:
        self._jobs.put((sink, what, call))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            sink, what, call = job
            try:
                call()
            except Exception as exc:  # tracking must never fail a round: warn and go on
                self.failures += 1
                log.warning(
                    "tracking: %s could not record %s: %s (the run goes on)",
                    sink.name,
                    what,
                    one_line(exc),
                )


def start_tracking(
    config: Config, command: str, extra_params: Mapping[str, object] | None = None
) -> RunTracker | None:
    """Open the run ``[tracking]`` asks for, or None when it asks for none.

    Args:
        config: The project.
        command: What runs (``serve``, ``simulate``): in the run's name and tags.
        extra_params: More parameters (the command's own options), logged with the config's.

    Raises:
        ConfigError: A destination cannot be written: the command should not start.
    """
    if not config.mlflow_uri and config.tensorboard_path is None:
        return None
    params = tracking_params(config)
    params.update({key: _text(value) for key, value in (extra_params or {}).items()})
    return RunTracker.open(
        mlflow_uri=config.mlflow_uri,
        tensorboard_dir=config.tensorboard_path,
        experiment=config.tracking.experiment,
        run_name=run_name(config, command),
        params=params,
        tags=run_tags(config, command),
    )


def run_tags(config: Config, command: str) -> dict[str, str]:
    """The MLflow tags of a run: the command, the project and flctl's version."""
    return {
        "flctl.command": command,
        "flctl.project": config.project.name,
        "flctl.version": __version__,
    }
