"""The Admin service's replies as the JSON objects the dashboard's pages read."""

from __future__ import annotations

import json
from typing import Any

from flctl.core.events import TERMINAL_ROUND_STATUSES
from flctl.transport.grpc import from_value_map, pb

__all__ = [
    "client_view",
    "event_view",
    "model_view",
    "open_round_view",
    "round_view",
    "update_view",
]


def _number(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def round_view(info: pb.RoundInfo) -> dict[str, Any]:
    """One round: status, contributors, duration, metrics, reason, its updates when listed."""
    out: dict[str, Any] = {
        "round": int(info.server_round),
        "status": info.status,
        "done": info.status in TERMINAL_ROUND_STATUSES,
        "num_clients": int(info.num_clients),
        "metrics": from_value_map(info.metrics),
        "duration_s": _number(info.duration_s),
        "reason": info.reason,
        "model_version": int(info.model_version),
        "created_unix": _number(info.created_unix),
        "phases": [{"phase": p.phase, "seconds": _number(p.seconds)} for p in info.phases],
    }
    if info.updates_listed:
        out["updates"] = [update_view(u) for u in info.updates]
        out["updates_left_out"] = int(info.updates_left_out)
    return out


def update_view(info: pb.UpdateInfo) -> dict[str, Any]:
    """One client's update of a round, with its anomaly scores where computed."""
    scores: dict[str, float] = {}
    if info.HasField("scores"):
        for name in ("l2", "cosine", "median_distance"):
            if info.scores.HasField(name):
                scores[name] = _number(getattr(info.scores, name), 6)
    return {
        "client_id": info.client_id,
        "status": info.status,
        "reason": info.reason,
        "num_examples": int(info.num_examples),
        "scores": scores,
        "outlier": info.outlier,
        "excluded": bool(info.excluded),
    }


def open_round_view(info: pb.OpenRound) -> dict[str, Any]:
    """The round in training: deadline, quorum, where each selected client stands."""
    return {
        "round": int(info.server_round),
        "deadline_unix": _number(info.deadline_unix),
        "min_clients": int(info.min_clients),
        "at_deadline": info.at_deadline,
        "participants": [
            {
                "client_id": p.client_id,
                "state": p.state,
                "progress": _number(p.progress),
                "bytes_per_s": _number(p.bytes_per_s, 0),
            }
            for p in info.participants
        ],
    }


def client_view(info: pb.ClientInfo) -> dict[str, Any]:
    """One known client: live state, last seen, rounds joined, bytes each way."""
    return {
        "client_id": info.client_id,
        "state": info.state,
        "last_seen_unix": _number(info.last_seen_unix),
        "rounds_joined": int(info.rounds_joined),
        "bytes_up": int(info.bytes_up),
        "bytes_down": int(info.bytes_down),
    }


def model_view(info: pb.ModelInfo, head: int) -> dict[str, Any]:
    """One model version: lineage (parent, kind, round), digest, metrics, tags."""
    return {
        "version": int(info.version),
        "digest": info.digest,
        "parent": int(info.parent),
        "server_round": int(info.server_round),
        "kind": info.kind,
        "metrics": from_value_map(info.metrics),
        "created_unix": _number(info.created_unix),
        "tags": list(info.tags),
        "is_head": int(info.version) == head,
    }


def event_view(event: pb.Event) -> dict[str, Any]:
    """One event of the log; ``data`` is its JSON object (an empty one when it is not)."""
    try:
        data = json.loads(event.data_json) if event.data_json else {}
    except ValueError:
        data = {}
    return {
        "seq": int(event.seq),
        "time_unix": _number(event.time_unix),
        "type": event.type,
        "round": int(event.server_round),
        "client_id": event.client_id,
        "data": data if isinstance(data, dict) else {},
    }
