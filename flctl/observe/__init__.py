"""Observability fed by the event log: Prometheus metrics, JSON log lines, run tracking.

Everything here reads the same :class:`~flctl.core.Event` stream as the live panel, so a
metric, a log line and a tracked run can never disagree with what ``round watch`` shows.
"""

from __future__ import annotations

from ._export import ExportReport, export_run
from ._logging import CONTEXT_FIELDS, JsonFormatter, event_level, log_event
from ._metrics import CLIENT_STATES, ROUND_PHASES, MetricsCollector
from ._reasons import (
    REFUSAL_REASONS,
    UPDATE_REJECTION_REASONS,
    refusal_reason,
    update_rejection_reason,
)
from ._server import MetricsServer, parse_metrics_address
from ._sinks import HeadModel
from ._tracking import RunTracker, start_tracking, tracking_params

__all__ = [
    "CLIENT_STATES",
    "CONTEXT_FIELDS",
    "ExportReport",
    "HeadModel",
    "JsonFormatter",
    "MetricsCollector",
    "MetricsServer",
    "REFUSAL_REASONS",
    "ROUND_PHASES",
    "RunTracker",
    "UPDATE_REJECTION_REASONS",
    "event_level",
    "export_run",
    "log_event",
    "parse_metrics_address",
    "refusal_reason",
    "start_tracking",
    "tracking_params",
    "update_rejection_reason",
]
