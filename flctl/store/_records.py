"""Plain frozen records that the store hands to callers (never the ORM rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flctl.core.events import TERMINAL_ROUND_STATUSES

__all__ = [
    "ClientRecord",
    "MODEL_KINDS",
    "MODEL_STATUSES",
    "ModelRecord",
    "PendingRollbackRecord",
    "ROUND_STATUSES",
    "RoundRecord",
    "TERMINAL",
    "TagRecord",
    "UPDATE_STATUSES",
    "UpdateRecord",
]

#: How a model version came to be.
MODEL_KINDS = frozenset({"initial", "aggregate", "rollback", "import"})
#: Whether a version may become head: ``rejected`` ones were stopped by the validation gate.
MODEL_STATUSES = frozenset({"ok", "rejected"})
#: Every status a round can have, in the order a round normally passes through them.
ROUND_STATUSES = (
    "queued",
    "selecting",
    "training",
    "aggregating",
    "evaluating",
    "committed",
    "rejected",
    "failed",
    "cancelled",
)
#: Statuses a round never leaves.
TERMINAL = TERMINAL_ROUND_STATUSES
#: What the coordinator answered to an update.
UPDATE_STATUSES = frozenset({"accepted", "rejected"})


@dataclass(frozen=True)
class ModelRecord:
    """One version of the global model.

    Attributes:
        version: Version number, from 1, one higher for every model written.
        digest: SHA-256 of the model's blob in the blob store.
        parent: The version this one was derived from, or None.
        server_round: The round that produced it, or None (initial, rollback, import).
        kind: ``initial``, ``aggregate``, ``rollback`` or ``import``.
        metrics: The metrics recorded with it.
        created: Unix time it was written.
        status: ``ok``, or ``rejected`` when the validation gate kept it from becoming head.
        reason: Why it was rejected, or why it was written (a rollback's ``--reason``), or "".
        author: Who made it: ``round``, an admin identity, ``local`` (a command run without a
            coordinator) or ``policy``; "" when unknown (written before schema version 2).
        source: For a rollback, the version whose weights it restores; otherwise None.
        config: The strategy and settings it was produced with (a round's config), or {}.
        config_hash: SHA-256 of ``config`` in canonical JSON, or "" when there is none.
        state_digest: The blob of the strategy's state that goes with these weights (a
            safetensors file), or "" when the strategy keeps none.
    """

    version: int
    digest: str
    parent: int | None
    server_round: int | None
    kind: str
    metrics: dict[str, float]
    created: float
    status: str = "ok"
    reason: str = ""
    author: str = ""
    source: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    state_digest: str = ""

    @property
    def is_rejected(self) -> bool:
        """Whether the validation gate rejected it (it is kept, but never became head)."""
        return self.status == "rejected"


@dataclass(frozen=True)
class TagRecord:
    """A name given to a model version.

    Attributes:
        name: The tag (unique in the store).
        version: The version it names.
        author: Who set it.
        created: Unix time it was set (or last moved).
    """

    name: str
    version: int
    author: str
    created: float


@dataclass(frozen=True)
class RoundRecord:
    """One federated round and where it stands.

    Attributes:
        id: Round number, from 1, global to the store.
        status: One of :data:`ROUND_STATUSES`.
        created: Unix time it was queued.
        started: Unix time it left the queue, or None.
        ended: Unix time it reached a terminal status, or None.
        base_version: The model version it started from, or None.
        model_version: The model version it committed, or None.
        num_clients: Number of updates that went into the aggregate.
        selected: Client ids selected for it.
        metrics: The round's metrics (set when it commits).
        reason: Why it failed or was cancelled, or "".
        deadline: Unix time its training phase ends, or None.
        config: Per-round settings given when it was queued.
        tasks: Client id -> task id of the selected clients ({} before selection).
        fit_config: Client id -> the extra fit config the strategy gave it ({}: none).
    """

    id: int
    status: str
    created: float
    started: float | None
    ended: float | None
    base_version: int | None
    model_version: int | None
    num_clients: int
    selected: list[str]
    metrics: dict[str, float]
    reason: str
    deadline: float | None
    config: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)
    fit_config: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end, or None while either is unset."""
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    @property
    def is_terminal(self) -> bool:
        """Whether the round can no longer change."""
        return self.status in TERMINAL


@dataclass(frozen=True)
class UpdateRecord:
    """One update a client sent, accepted or rejected.

    Attributes:
        id: Row id, from 1.
        server_round: The round the client said it was for.
        client_id: Who sent it.
        task_id: The task it answered.
        status: ``accepted`` or ``rejected``.
        reason: Why it was rejected, or "".
        digest: SHA-256 of its blob, or "" when nothing was stored.
        size: Size of the blob in bytes.
        num_examples: Number of training examples the client reported.
        metrics: The client's training metrics.
        created: Unix time it was recorded.
        scores: Its anomaly scores (score name -> number, or None where not computed:
            ``l2``, ``cosine``, ``median_distance``); None while it was not scored.
        outlier: Why the outlier rule marked it (``[strategy] exclude_outliers``), or "".
        is_excluded: Whether it was left out of the round's aggregate as an outlier.
    """

    id: int
    server_round: int
    client_id: str
    task_id: str
    status: str
    reason: str
    digest: str
    size: int
    num_examples: int
    metrics: dict[str, float]
    created: float
    scores: dict[str, float | None] | None = None
    outlier: str = ""
    is_excluded: bool = False


@dataclass(frozen=True)
class ClientRecord:
    """What the coordinator knows about one client.

    Attributes:
        client_id: The identity from the client's certificate.
        fingerprint: SHA-256 fingerprint of its certificate, or "".
        state: Last reported state (idle, downloading, training, uploading, offline).
        first_seen: Unix time it was first seen.
        last_seen: Unix time it was last seen.
        rounds_joined: Number of rounds it was selected for.
        bytes_up: Bytes it uploaded.
        bytes_down: Bytes it downloaded.
    """

    client_id: str
    fingerprint: str
    state: str
    first_seen: float
    last_seen: float
    rounds_joined: int
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class PendingRollbackRecord:
    """A rollback asked for while a round ran; applied when that round ends.

    Attributes:
        id: Row id, from 1.
        source: The version whose weights become the head again.
        author: The admin identity that asked.
        reason: Its ``--reason``.
        server_round: The round it waits for.
        created: Unix time it was asked for.
    """

    id: int
    source: int
    author: str
    reason: str
    server_round: int
    created: float
