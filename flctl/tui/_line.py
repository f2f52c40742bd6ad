"""One plain-text line per event, for logs and the dashboard's footer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from flctl.core.events import (
    CLIENT_EVICTED,
    CLIENT_JOINED,
    CLIENT_LEFT,
    CLIENT_STATE,
    COORDINATOR_DRAINING,
    COORDINATOR_STARTED,
    COORDINATOR_STOPPED,
    COORDINATOR_WARNING,
    IDENTITY_REVOKED,
    MODEL_CORRUPT,
    MODEL_CREATED,
    MODEL_REJECTED,
    MODEL_ROLLBACK,
    MODEL_ROLLBACK_DEFERRED,
    MODEL_ROLLBACK_FAILED,
    MODEL_TAGGED,
    PRIVACY_CHARGED,
    PRIVACY_REFUSED,
    ROUND_CANCELLED,
    ROUND_COMMITTED,
    ROUND_FAILED,
    ROUND_QUEUED,
    ROUND_REJECTED,
    ROUND_STARTED,
    ROUND_STATUS,
    SECURITY_REFUSED,
    STORAGE_FULL,
    TASK_SENT,
    UPDATE_ACCEPTED,
    UPDATE_CLAMPED,
    UPDATE_EXCLUDED,
    UPDATE_REJECTED,
    UPDATE_SCORED,
    Event,
)
from flctl.tui._data import (
    format_bytes,
    format_rate,
    get_float,
    get_int,
    get_metrics,
    get_str,
    get_str_list,
)

__all__ = [
    "event_line",
    "format_ago",
    "format_duration",
    "format_metric",
    "format_metrics",
    "is_notable",
    "plural",
]

#: Metrics shown first, in this order; the rest follow sorted by name.
_LEADING_METRICS = ("accuracy", "loss")


def format_duration(seconds: float) -> str:
    """Format a duration: ``1.8 s``, ``42 s``, ``2m 05s``, ``1h 02m``."""
    seconds = max(0.0, seconds)
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_ago(seconds: float) -> str:
    """Format the age of something: ``3s ago``, ``5m ago``, ``2h ago``, ``4d ago``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s ago"
    if whole < 3600:
        return f"{whole // 60}m ago"
    if whole < 86400:
        return f"{whole // 3600}h ago"
    return f"{whole // 86400}d ago"


def format_metric(value: float | None) -> str:
    """Format one metric value with four decimals, or ``-`` when absent."""
    return "-" if value is None else f"{value:.4f}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Format metrics as ``accuracy 0.9611, loss 0.1234, ...`` (accuracy and loss first)."""
    names = [name for name in _LEADING_METRICS if name in metrics]
    names += sorted(name for name in metrics if name not in _LEADING_METRICS)
    return ", ".join(f"{name} {format_metric(metrics[name])}" for name in names)


def plural(count: int, noun: str) -> str:
    """Return ``"1 client"`` or ``"3 clients"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _timestamp(unix: float) -> str:
    try:
        return datetime.fromtimestamp(unix, tz=UTC).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "--:--:--"


def _with_reason(text: str, reason: str) -> str:
    return f"{text}: {reason}" if reason else text


def _coordinator_started(event: Event) -> str:
    data = event.data
    address = get_str(data, "address")
    text = f"coordinator started on {address}" if address else "coordinator started"
    head = get_int(data, "head_version")
    return f"{text}, head model v{head}" if head is not None else f"{text}, no model yet"


def _coordinator_draining(event: Event) -> str:
    timeout = get_float(event.data, "timeout_s")
    server_round = get_int(event.data, "server_round")
    if server_round is None:
        return "coordinator draining: no round running, stopping"
    limit = f" {timeout:g} s" if timeout is not None else ""
    return f"coordinator draining: round {server_round} gets{limit} to end, no new round starts"


def _coordinator_stopped(event: Event) -> str:
    return _with_reason("coordinator stopped", get_str(event.data, "reason"))


def _client_joined(event: Event) -> str:
    return f"client {event.client_id} joined"


def _client_evicted(event: Event) -> str:
    admin = get_str(event.data, "admin", "an admin")
    return _with_reason(
        f"client {event.client_id} evicted by {admin}", get_str(event.data, "reason")
    )


def _client_left(event: Event) -> str:
    return _with_reason(f"client {event.client_id} left", get_str(event.data, "reason"))


def _client_state(event: Event) -> str:
    reason = get_str(event.data, "reason")
    if reason:  # a failed task, in the client's words: "fit raised NameError: ... (task.py:57)"
        return f"client {event.client_id} failed round {event.server_round}: {reason}"
    text = f"client {event.client_id} {get_str(event.data, 'state', 'unknown')}"
    progress = get_float(event.data, "progress")
    if progress is None:
        return text
    done, total = get_float(event.data, "bytes_done"), get_float(event.data, "bytes_total")
    rate = get_float(event.data, "bytes_per_s")
    if done is None or not total:
        return f"{text} ({progress:.0%})"
    moved = f"{format_bytes(done)} of {format_bytes(total)}"
    return f"{text} ({progress:.0%}, {moved}" + (f", {format_rate(rate)})" if rate else ")")


def _round_queued(event: Event) -> str:
    retry_of = get_int(event.data, "retry_of")
    if retry_of is None:
        return f"round {event.server_round} queued"
    attempt = get_int(event.data, "attempt")
    return f"round {event.server_round} queued: retry {attempt or '?'} of failed round {retry_of}"


def _round_started(event: Event) -> str:
    data = event.data
    selected = plural(len(get_str_list(data, "selected")), "client")
    text = f"round {event.server_round} started: {selected} selected"
    min_clients = get_int(data, "min_clients")
    if min_clients is not None:
        text += f" (min {min_clients})"
    deadline = get_float(data, "deadline_unix")
    if deadline is not None:
        text += f", deadline in {format_duration(deadline - event.time)}"
    return text


def _round_status(event: Event) -> str:
    return f"round {event.server_round} {get_str(event.data, 'status', 'unknown')}"


def _task_sent(event: Event) -> str:
    kind = get_str(event.data, "kind", "task")
    return f"round {event.server_round}: {kind} task sent to {event.client_id}"


def _update_accepted(event: Event) -> str:
    text = f"round {event.server_round}: update from {event.client_id} accepted"
    details = []
    examples = get_int(event.data, "num_examples")
    if examples is not None:
        details.append(plural(examples, "example"))
    metrics = format_metrics(get_metrics(event.data))
    if metrics:
        details.append(metrics)
    return f"{text} ({', '.join(details)})" if details else text


def _update_rejected(event: Event) -> str:
    text = f"round {event.server_round}: update from {event.client_id} rejected"
    return _with_reason(text, get_str(event.data, "reason"))


def _update_clamped(event: Event) -> str:
    data = event.data
    claimed, used = get_int(data, "claimed"), get_int(data, "used")
    text = f"round {event.server_round}: update from {event.client_id} weighs as {used}"
    text += f" of the {claimed} examples claimed"
    bound = get_str(data, "bound")
    return f"{text} ({bound})" if bound else text


def _update_scored(event: Event) -> str:
    data = event.data
    parts = [
        f"{label} {value:.4g}"
        for label, value in (
            ("l2", get_float(data, "l2")),
            ("cos", get_float(data, "cosine")),
            ("med-dist", get_float(data, "median_distance")),
        )
        if value is not None
    ]
    text = f"round {event.server_round}: update from {event.client_id} scored"
    return f"{text}: {', '.join(parts)}" if parts else text


def _update_excluded(event: Event) -> str:
    data = event.data
    what = "flagged" if get_str(data, "mode") == "flag" else "excluded"
    text = f"round {event.server_round}: update from {event.client_id} {what} as an outlier"
    score, value, z = get_str(data, "score"), get_float(data, "value"), get_float(data, "z")
    if score and value is not None and z is not None:
        text += f" ({score} {value:.4g}, z {z:.2f})"
    return text


def _round_summary(event: Event, status: str) -> str:
    data = event.data
    parts = []
    num_clients = get_int(data, "num_clients")
    if num_clients is not None:
        parts.append(plural(num_clients, "client"))
    metrics = format_metrics(get_metrics(data))
    if metrics:
        parts.append(metrics)
    text = f"round {event.server_round} {status}"
    if parts:
        text += ": " + ", ".join(parts)
    duration = get_float(data, "duration_s")
    return f"{text} ({format_duration(duration)})" if duration is not None else text


def _round_committed(event: Event) -> str:
    return _round_summary(event, "committed")


def _round_rejected(event: Event) -> str:
    text = _round_summary(event, "rejected")
    version = get_int(event.data, "model_version")
    kept = f"model v{version} kept" if version is not None else "model kept"
    return f"{text}; {kept}, head stays"


def _model_rejected(event: Event) -> str:
    version = get_int(event.data, "version")
    name = f"model v{version}" if version is not None else "model"
    text = f"{name} rejected by the validation gate"
    return _with_reason(text, get_str(event.data, "reason"))


def _round_ended(status: str) -> Callable[[Event], str]:
    def describe(event: Event) -> str:
        text = f"round {event.server_round} {status}"
        return _with_reason(text, get_str(event.data, "reason"))

    return describe


def _model_created(event: Event) -> str:
    data = event.data
    version = get_int(data, "version")
    text = f"model v{version} created" if version is not None else "model created"
    details = []
    kind = get_str(data, "kind")
    if kind:
        details.append(kind)
    parent = get_int(data, "parent")
    if parent is not None:
        details.append(f"parent v{parent}")
    if data.get("head") is True:
        details.append("head")
    return f"{text} ({', '.join(details)})" if details else text


def _coordinator_warning(event: Event) -> str:
    return f"warning: {get_str(event.data, 'message', 'see the coordinator log')}"


def _model_corrupt(event: Event) -> str:
    return f"error: {get_str(event.data, 'reason', 'the head model is corrupt')}"


def _identity_revoked(event: Event) -> str:
    serial = get_str(event.data, "serial")
    what = f"certificate {serial} of {event.client_id}" if serial else event.client_id
    text = f"{what} revoked by {get_str(event.data, 'author', 'unknown')}"
    return _with_reason(text, get_str(event.data, "reason"))


def _security_refused(event: Event) -> str:
    rpc = get_str(event.data, "rpc", "a call")
    text = f"refused {event.client_id} on {rpc}"
    return _with_reason(text, get_str(event.data, "reason"))


def _privacy_charged(event: Event) -> str:
    epsilon = get_float(event.data, "epsilon")
    budget = get_float(event.data, "budget")
    accountant = get_str(event.data, "accountant", "rdp")
    spent = "?" if epsilon is None else f"{epsilon:.4f}"
    of = "" if budget is None else f" of {budget:g}"
    return f"round {event.server_round} charged: epsilon {spent}{of} ({accountant})"


def _privacy_refused(event: Event) -> str:
    return _with_reason(f"round {event.server_round} refused", get_str(event.data, "reason"))


def _model_rollback(event: Event) -> str:
    data = event.data
    return (
        f"rolled back to v{get_int(data, 'source')}: head is v{get_int(data, 'version')} "
        f"(by {get_str(data, 'author', 'unknown')})"
    )


def _model_rollback_deferred(event: Event) -> str:
    data = event.data
    return (
        f"rollback to v{get_int(data, 'source')} deferred until round "
        f"{get_int(data, 'server_round')} ends (by {get_str(data, 'author', 'unknown')})"
    )


def _model_rollback_failed(event: Event) -> str:
    text = f"deferred rollback to v{get_int(event.data, 'source')} failed"
    return _with_reason(text, get_str(event.data, "error"))


def _model_tagged(event: Event) -> str:
    data = event.data
    return f"tagged v{get_int(data, 'version')} as {get_str(data, 'tag')!r}"


def _storage_full(event: Event) -> str:
    free = get_float(event.data, "free_bytes")
    room = f"{format_bytes(free)} free" if free is not None else "no room"
    what = get_str(event.data, "what", "write")
    return f"storage full: {get_str(event.data, 'path')} has {room}; an {what} was refused"


_DESCRIBE: dict[str, Callable[[Event], str]] = {
    COORDINATOR_STARTED: _coordinator_started,
    COORDINATOR_DRAINING: _coordinator_draining,
    COORDINATOR_STOPPED: _coordinator_stopped,
    CLIENT_JOINED: _client_joined,
    CLIENT_LEFT: _client_left,
    CLIENT_EVICTED: _client_evicted,
    CLIENT_STATE: _client_state,
    ROUND_QUEUED: _round_queued,
    ROUND_STARTED: _round_started,
    ROUND_STATUS: _round_status,
    TASK_SENT: _task_sent,
    UPDATE_ACCEPTED: _update_accepted,
    UPDATE_REJECTED: _update_rejected,
    UPDATE_CLAMPED: _update_clamped,
    UPDATE_SCORED: _update_scored,
    UPDATE_EXCLUDED: _update_excluded,
    ROUND_COMMITTED: _round_committed,
    ROUND_REJECTED: _round_rejected,
    ROUND_FAILED: _round_ended("failed"),
    ROUND_CANCELLED: _round_ended("cancelled"),
    MODEL_CREATED: _model_created,
    MODEL_REJECTED: _model_rejected,
    COORDINATOR_WARNING: _coordinator_warning,
    MODEL_CORRUPT: _model_corrupt,
    STORAGE_FULL: _storage_full,
    IDENTITY_REVOKED: _identity_revoked,
    SECURITY_REFUSED: _security_refused,
    PRIVACY_CHARGED: _privacy_charged,
    PRIVACY_REFUSED: _privacy_refused,
    MODEL_ROLLBACK: _model_rollback,
    MODEL_ROLLBACK_DEFERRED: _model_rollback_deferred,
    MODEL_ROLLBACK_FAILED: _model_rollback_failed,
    MODEL_TAGGED: _model_tagged,
}


def is_notable(event: Event) -> bool:
    """Return whether an event deserves a line of its own in a log or the panel's footer.

    Everything is, but what every heartbeat and every task repeats: a client's state
    (``client c1 training``, already in the panel's Clients table) unless it failed, and each
    task sent (the round's start says how many clients were selected), and each update's
    anomaly scores (``round status`` lists them; an outlier has its own ``update.excluded``
    line). A plain log of a run then reads as its story: joins and leaves, round phases,
    updates accepted, rejected or excluded, models created, rounds committed or failed.

    Args:
        event: Any event.
    """
    if event.type in (TASK_SENT, UPDATE_SCORED):
        return False
    if event.type == CLIENT_STATE:
        return get_str(event.data, "state") == "failed"
    return True


def event_line(event: Event) -> str:
    """Describe one event as a single plain-text line, for logs when stdout is not a terminal.

    Args:
        event: Any event; types this version does not know are named as they are.

    Returns:
        ``HH:MM:SS`` (UTC, from ``event.time``), a space and a short description, e.g.
        ``"12:00:03 round 3 committed: 3 clients, accuracy 0.9611, loss 0.1234 (1.8 s)"``.
    """
    describe = _DESCRIBE.get(event.type)
    if describe is None:
        text = event.type
        if event.server_round:
            text += f" round {event.server_round}"
        if event.client_id:
            text += f" client {event.client_id}"
    else:
        text = describe(event)
    return f"{_timestamp(event.time)} {text}"
