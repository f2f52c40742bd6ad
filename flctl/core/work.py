"""The work a coordinator hands a client, and what comes back, as plain data.

The round engine builds :class:`Task` values; a client answers a fit with an update announced by
an :class:`UploadHeader`, and the coordinator answers that with an :class:`UploadAnswer`. The
transport turns these into its own messages at its edge (``flctl.transport.grpc``:
:func:`~flctl.transport.grpc.task_to_pb`, ``upload_header_from_pb`` and back), so that a
transport other than gRPC (the in-process one of ``flctl simulate``) carries the same values
through the same checks. No transport type leaks past here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from flctl.core.config import ConfigValue
from flctl.core.errors import InvalidInputError, LimitExceededError

__all__ = ["SecAggAnswer", "Task", "TaskKind", "UploadAnswer", "UploadHeader", "check_metrics"]

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


@dataclass(frozen=True)
class UploadHeader:
    """What a client says about the update it uploads, before its bytes.

    Every field is as the client sent it: the coordinator checks each one before it touches
    state (``flctl.coordinator``'s upload path), whichever transport carried it.

    Attributes:
        server_round: The round the update answers.
        task_id: The task it answers (the round's task for this client).
        digest: The SHA-256 of the update's bytes.
        size: Their length.
        num_examples: The client's weight in the aggregate (examples it trained on).
        metrics: The fit's metrics, unchecked (:func:`check_metrics` checks them); a value that
            is not a number stays as sent (None where the transport carried none) and is
            refused there.
        codec: The compression of the data pieces ("" or "none": raw).
        encoding: "full" (the model's new tensors) or "delta" (new minus base).
        dtype: The tensors' dtype on the wire ("" for the model's own).
        base_digest: The model a delta is relative to.
        upload_id: The upload to resume ("": find or begin one).
        offset: Where the data that follows starts (the bytes the coordinator holds).
    """

    server_round: int
    task_id: str
    digest: str
    size: int
    num_examples: int
    metrics: Mapping[str, object] = field(default_factory=dict)
    codec: str = ""
    encoding: str = ""
    dtype: str = ""
    base_digest: str = ""
    upload_id: str = ""
    offset: int = 0


@dataclass(frozen=True)
class UploadAnswer:
    """The coordinator's answer to an upload (or to the beginning of one).

    Attributes:
        accepted: True when the update is accepted (or the upload may go on).
        reason: Why not, when refused for the round's state (late, duplicate, not selected).
        upload_id: The upload's id (resume with it).
        committed_offset: The bytes the coordinator holds.
    """

    accepted: bool
    reason: str = ""
    upload_id: str = ""
    committed_offset: int = 0


@dataclass(frozen=True)
class SecAggAnswer:
    """The coordinator's answer to a client's message of a secure-aggregation stage.

    A client sends its message for a stage (docs/secagg.md); the answer comes once the
    coordinator closed that stage, and carries the coordinator's message for the client's next
    stage, as JSON bytes (``flctl.security``'s SecAgg wire form).

    Attributes:
        accepted: False when the client is out of the round's secure aggregation (its message
            was refused, it came too late, the round failed): ``reason`` says why.
        reason: Why not, in one line.
        stage: The stage ``payload`` is for: ``share_keys``, ``masked_input``, ``unmask``, or
            ``done`` (nothing more to do).
        payload: The coordinator's message for that stage (empty for ``done``).
    """

    accepted: bool
    reason: str = ""
    stage: str = ""
    payload: bytes = b""


def check_metrics(
    source: Mapping[str, object], *, max_items: int = 64, max_key_bytes: int = 128
) -> dict[str, float]:
    """Check a client's metrics: bounded count and key length, finite numbers only.

    Raises:
        LimitExceededError: Too many entries or a key too long.
        InvalidInputError: A value is not a finite number.
    """
    if len(source) > max_items:
        raise LimitExceededError(f"metrics map has {len(source)} entries, more than {max_items}")
    out: dict[str, float] = {}
    for key, value in source.items():
        if len(key.encode()) > max_key_bytes:
            raise LimitExceededError(f"metric name longer than {max_key_bytes} bytes")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"metric {key!r} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise InvalidInputError(f"metric {key!r} is not finite ({number})")
        out[key] = number
    return out
