"""Plain work values (:mod:`flctl.core.work`) to and from the wire's messages."""

from __future__ import annotations

from flctl.core.errors import InvalidInputError
from flctl.core.work import Task, UploadAnswer, UploadHeader
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._values import from_value_map, raw_value_map, to_value_map

__all__ = ["task_from_pb", "task_to_pb", "upload_answer_to_pb", "upload_header_from_pb"]


def task_to_pb(task: Task) -> pb.Task:
    """The wire message of ``task``."""
    message = pb.Task(
        server_round=task.server_round,
        task_id=task.task_id,
        kind=task.kind,
        model_digest=task.model_digest,
        model_size=task.model_size,
        deadline_unix=task.deadline_unix,
    )
    to_value_map(message.config, task.config)
    return message


def task_from_pb(message: pb.Task) -> Task:
    """The task a wire message carries.

    Raises:
        InvalidInputError: Its kind is neither "fit" nor "evaluate", or its config holds a
            value that is not a boolean, number or string.
    """
    kind = message.kind or "fit"
    if kind not in ("fit", "evaluate"):
        raise InvalidInputError(f"unknown task kind {message.kind!r}")
    return Task(
        server_round=int(message.server_round),
        task_id=message.task_id,
        kind="fit" if kind == "fit" else "evaluate",
        model_digest=message.model_digest,
        model_size=int(message.model_size),
        deadline_unix=float(message.deadline_unix),
        config=from_value_map(message.config),
    )


def upload_header_from_pb(message: pb.UploadHeader) -> UploadHeader:
    """The header a wire message carries, unchecked (the coordinator checks every field)."""
    return UploadHeader(
        server_round=int(message.server_round),
        task_id=message.task_id,
        digest=message.digest,
        size=int(message.size),
        num_examples=int(message.num_examples),
        metrics=raw_value_map(message.metrics),
        codec=message.codec,
        encoding=message.encoding,
        dtype=message.dtype,
        base_digest=message.base_digest,
        upload_id=message.upload_id,
        offset=int(message.offset),
    )


def upload_answer_to_pb(answer: UploadAnswer) -> pb.UploadReply:
    """The wire message of an upload's answer."""
    return pb.UploadReply(
        accepted=answer.accepted,
        reason=answer.reason,
        upload_id=answer.upload_id,
        committed_offset=answer.committed_offset,
    )
