"""Observability fed by the event log: Prometheus metrics, JSON log lines, run tracking.

Everything here reads the same :class:`~flctl.core.Event` stream as the live panel, so a
metric, a log line and a tracked run can never disagree with what ``round watch`` shows.
"""

from __future__ import annotations

from ._logging import CONTEXT_FIELDS, JsonFormatter, event_level, log_event
from ._metrics import CLIENT_STATES, ROUND_PHASES, MetricsCollector
from ._reasons import (
    REFUSAL_REASONS,
    UPDATE_REJECTION_REASONS,
    refusal_reason,
    update_rejection_reason,
)
from ._server import MetricsServer, parse_metrics_address

__all__ = [
    "CLIENT_STATES",
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "MetricsCollector",
    "MetricsServer",
    "REFUSAL_REASONS",
    "ROUND_PHASES",
    "UPDATE_REJECTION_REASONS",
    "event_level",
    "log_event",
    "parse_metrics_address",
    "refusal_reason",
    "update_rejection_reason",
]
