"""The store's records (models, rounds, updates) as the Admin service's wire messages."""

from __future__ import annotations

from typing import Any

from flctl.store import UpdateRecord
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._values import to_value_map

__all__ = ["model_info", "round_info", "update_info"]


def model_info(record: Any) -> pb.ModelInfo:
    """A store ModelRecord as the wire's ModelInfo."""
    info = pb.ModelInfo(
        version=record.version,
        digest=record.digest,
        parent=record.parent or 0,
        server_round=record.server_round or 0,
        kind=record.kind,
        created_unix=record.created,
    )
    to_value_map(info.metrics, record.metrics)
    return info


def round_info(record: Any) -> pb.RoundInfo:
    """A store RoundRecord as the wire's RoundInfo."""
    info = pb.RoundInfo(
        server_round=record.id,
        status=record.status,
        num_clients=record.num_clients,
        duration_s=record.duration_s or 0.0,
        reason=record.reason or "",
        model_version=record.model_version or 0,
        created_unix=record.created,
    )
    to_value_map(info.metrics, record.metrics)
    return info


def update_info(record: UpdateRecord) -> pb.UpdateInfo:
    """A store UpdateRecord as the wire's UpdateInfo: who, its status, scores and verdict."""
    info = pb.UpdateInfo(
        client_id=record.client_id,
        status=record.status,
        reason=record.reason,
        num_examples=record.num_examples,
        outlier=record.outlier,
        excluded=record.is_excluded,
    )
    if record.scores is not None:
        info.scores.SetInParent()  # scored, even where no score was computed
        for name in ("l2", "cosine", "median_distance"):
            value = record.scores.get(name)
            if value is not None:
                setattr(info.scores, name, value)
    return info
