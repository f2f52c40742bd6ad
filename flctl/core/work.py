"""The work a coordinator hands a client, as plain data: no transport type leaks past here.

The round engine builds :class:`Task` values; the transport turns them into its own messages
at its edge (``flctl.transport.grpc``: :func:`~flctl.transport.grpc.task_to_pb` and back), so
that a transport other than gRPC (in-process simulation) can carry the same tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from flctl.core.config import ConfigValue

__all__ = ["Task", "TaskKind"]

#: What a task asks: train on the model ("fit") or score it ("evaluate").
TaskKind = Literal["fit", "evaluate"]


@dataclass(frozen=True)
class Task:
    """One task for one client.

    Attributes:
        server_round: The round it belongs to.
        task_id: Its id, unique in the round; the client's report names it.
        kind: ``"fit"`` or ``"evaluate"``.
        model_digest: The SHA-256 of the model to fit or evaluate.
        model_size: That model's size in bytes.
        deadline_unix: When the round stops waiting for the client (Unix time).
        config: The client's config for this task: ``[task]``, the strategy's entries, the
            privacy entries and ``server_round``.
    """

    server_round: int
    task_id: str
    kind: TaskKind
    model_digest: str
    model_size: int
    deadline_unix: float
    config: Mapping[str, ConfigValue] = field(default_factory=dict)
