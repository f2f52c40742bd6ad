"""The task a selected client is sent: fit or evaluate, as plain data (no wire message)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flctl.core.work import Task, TaskKind

__all__ = ["build_task"]


def build_task(
    kind: TaskKind,
    server_round: int,
    task_id: str,
    digest: str,
    model_size: int,
    deadline: float,
    config: Mapping[str, Any],
) -> Task:
    """A ``kind`` task for the model ``digest``.

    ``server_round`` is set in the task's config last: no other entry can change it.
    """
    return Task(
        server_round=server_round,
        task_id=task_id,
        kind=kind,
        model_digest=digest,
        model_size=model_size,
        deadline_unix=deadline,
        config={**config, "server_round": server_round},
    )
