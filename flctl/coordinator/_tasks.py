"""The task message a selected client is sent: fit or evaluate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flctl.transport.grpc import pb, to_value_map

__all__ = ["build_task"]


def build_task(
    kind: str,
    server_round: int,
    task_id: str,
    digest: str,
    model_size: int,
    deadline: float,
    config: Mapping[str, Any],
) -> pb.Task:
    """A ``kind`` ("fit", "evaluate") task for the model ``digest``.

    ``server_round`` is set in the task's config last: no other entry can change it.
    """
    task = pb.Task(
        server_round=server_round,
        task_id=task_id,
        kind=kind,
        model_digest=digest,
        model_size=model_size,
        deadline_unix=deadline,
    )
    to_value_map(task.config, {**config, "server_round": server_round})
    return task
