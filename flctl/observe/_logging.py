"""JSON log lines (``flctl --log-format json``): one JSON object per log record.

Each line holds ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger`` and ``message``,
then whichever of :data:`CONTEXT_FIELDS` the record carries: callers pass them with
``extra=``, e.g. ``log.info("round %d committed", 3, extra={"round": 3})``. A traceback is one
string under ``exception``; a line never spans two lines.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from flctl.core import Event
from flctl.core import events as ev

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "event_level", "log_event"]

#: ``extra=`` keys a line carries when a record has them (and they are not None or ""):
#: the round, the client and the request (task or upload) it concerns; an event's type, seq
#: and data (``serve``'s event lines); an error's JSON object (the CLI's error lines).
CONTEXT_FIELDS = ("round", "client", "request_id", "event", "seq", "data", "error")

#: Events that tell of something gone wrong: their lines are at WARNING, the others at INFO.
_WARNINGS = frozenset(
    {
        ev.ROUND_FAILED,
        ev.ROUND_REJECTED,
        ev.UPDATE_REJECTED,
        ev.UPDATE_EXCLUDED,
        ev.EVALUATION_FAILED,
        ev.SECURITY_REFUSED,
        ev.PRIVACY_REFUSED,
        ev.STORAGE_FULL,
        ev.MODEL_CORRUPT,
        ev.MODEL_REJECTED,
        ev.MODEL_ROLLBACK_FAILED,
        ev.COORDINATOR_WARNING,
    }
)


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of JSON.

    Example:
        ::

            handler = logging.StreamHandler()
            handler.setFormatter(JsonFormatter())
            logging.getLogger().addHandler(handler)
            logging.getLogger("flctl.coordinator").info("up", extra={"round": 3})
            # {"time": "2025-01-02T03:04:05.678Z", "level": "INFO",
            #  "logger": "flctl.coordinator", "message": "up", "round": 3}
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object on one line (no trailing newline)."""
        line: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None and value != "":
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def _iso_utc(unix: float) -> str:
    """``2025-01-02T03:04:05.678Z``."""
    stamp = datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def event_level(event: Event) -> int:
    """The level an event's log line is written at: WARNING for failures, else INFO.

    Args:
        event: Any event.
    """
    if event.type in _WARNINGS:
        return logging.WARNING
    if event.type == ev.CLIENT_STATE and event.data.get("state") == "failed":
        return logging.WARNING
    return logging.INFO


def log_event(logger: logging.Logger, event: Event, message: str) -> None:
    """Log one event as a record carrying its round, client, type, seq and data.

    With :class:`JsonFormatter` that is a JSON line whose ``time`` is the event's own.

    Args:
        logger: Where to log it (``serve`` uses ``flctl.events``).
        event: The event.
        message: What a person reads (``serve``'s plain line for it, without its time).
    """
    level = event_level(event)
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {"event": event.type, "seq": event.seq, "data": event.data}
    if event.server_round:
        extra["round"] = event.server_round
    if event.client_id:
        extra["client"] = event.client_id
    record = logger.makeRecord(logger.name, level, "(event)", 0, message, (), None, extra=extra)
    record.created = event.time
    record.msecs = (event.time - int(event.time)) * 1000.0
    logger.handle(record)
