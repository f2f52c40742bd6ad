"""Payloads of the model registry's events: versions created, rejected, corrupt, rolled back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from flctl.core._payload import EventPayload, optional_field, renamed

__all__ = [
    "ModelCorrupt",
    "ModelCreated",
    "ModelImported",
    "ModelRejected",
    "ModelRollback",
    "ModelRollbackDeferred",
    "ModelRollbackFailed",
    "ModelTagged",
]


@dataclass(frozen=True)
class ModelCreated(EventPayload):
    """A model version was written and became the head (the initial one, or a round's).

    Attributes:
        version: Its version.
        digest: Its blob's digest.
        kind: ``initial`` or ``aggregate``.
        parent: The version it derives from, or None (written as null).
        metrics: Its metrics; written only when given (the initial model has none).
        is_head: Whether it became the head; key ``head``.
    """

    type: ClassVar[str] = "model.created"
    version: int
    digest: str
    kind: str
    parent: int | None
    metrics: Mapping[str, float] | None = optional_field()
    is_head: bool = field(default=True, metadata=renamed("head"))


@dataclass(frozen=True)
class ModelRejected(EventPayload):
    """An aggregate the validation gate kept from becoming head (docs/registry.md).

    Attributes:
        version: The stored (rejected) version.
        digest: Its blob's digest.
        parent: The version it derives from, or None.
        metrics: Its finite metrics.
        reason: The gate's reason.
        check: The check that failed: ``finite`` or ``metric``.
        metric: The gate's metric, or None.
        value: The aggregate's value of it, or None.
        reference: The reference version's value, or None.
        reference_version: The reference version, or None.
        against: ``best`` or ``head`` when metrics were compared, else None.
        max_regression: The allowed regression when metrics were compared, else None.
    """

    type: ClassVar[str] = "model.rejected"
    version: int
    digest: str
    parent: int | None
    metrics: Mapping[str, float]
    reason: str
    check: str
    metric: str | None
    value: float | None
    reference: float | None
    reference_version: int | None
    against: str | None
    max_regression: float | None


@dataclass(frozen=True)
class ModelCorrupt(EventPayload):
    """The head model's blob no longer hashes to its digest, or is missing.

    It is not served, and rounds are refused with ``reason`` until the head is intact again.

    Attributes:
        version: The head's version.
        digest: Its digest.
        path: Its blob's path.
        problem: What is wrong with the blob.
        rollback_to: The newest intact version, or None (written as null).
        reason: Why rounds are refused, and the way out.
    """

    type: ClassVar[str] = "model.corrupt"
    version: int
    digest: str
    path: str
    problem: str
    rollback_to: int | None
    reason: str


@dataclass(frozen=True)
class ModelRollback(EventPayload):
    """The head moved back: a new version that points at an old digest.

    Attributes:
        version: The new version.
        digest: Its digest (the restored version's).
        source: The version restored.
        previous_head: The head before, or None.
        author: Who rolled back.
        reason: Why.
    """

    type: ClassVar[str] = "model.rollback"
    version: int
    digest: str
    source: int
    previous_head: int | None
    author: str
    reason: str


@dataclass(frozen=True)
class ModelRollbackDeferred(EventPayload):
    """A rollback waits for the open round to end.

    Attributes:
        source: The version to restore.
        digest: Its digest.
        server_round: The open round it waits for.
        author: Who asked for it.
        reason: Why.
    """

    type: ClassVar[str] = "model.rollback_deferred"
    source: int
    digest: str
    server_round: int
    author: str
    reason: str


@dataclass(frozen=True)
class ModelRollbackFailed(EventPayload):
    """A deferred rollback could not apply.

    Attributes:
        source: The version it was to restore.
        server_round: The round it waited for.
        author: Who asked for it.
        reason: Why they asked.
        error: Why it failed.
    """

    type: ClassVar[str] = "model.rollback_failed"
    source: int
    server_round: int
    author: str
    reason: str
    error: str


@dataclass(frozen=True)
class ModelTagged(EventPayload):
    """A tag names a (new) version.

    Attributes:
        tag: The tag.
        version: The version it names now.
        previous: The version it named before, or None.
        author: Who tagged.
    """

    type: ClassVar[str] = "model.tagged"
    tag: str
    version: int
    previous: int | None
    author: str


@dataclass(frozen=True)
class ModelImported(EventPayload):
    """A model file was imported as a new version (``flctl models import``, offline).

    Attributes:
        version: The new version.
        digest: Its digest.
        parent: The version it derives from, or None.
        is_head: Whether it became the head; key ``head``.
        file: The imported file's name.
        author: Who imported it.
    """

    type: ClassVar[str] = "model.imported"
    version: int
    digest: str
    parent: int | None
    is_head: bool = field(metadata=renamed("head"))
    file: str
    author: str
