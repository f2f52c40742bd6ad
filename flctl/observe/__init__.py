"""Observability fed by the event log: Prometheus metrics, JSON log lines, run tracking.

Everything here reads the same :class:`~flctl.core.Event` stream as the live panel, so a
metric, a log line and a tracked run can never disagree with what ``round watch`` shows.
"""

__all__: list[str] = []
