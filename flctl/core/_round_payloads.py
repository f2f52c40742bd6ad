"""Payloads of a round's events: statuses, tasks, updates, evaluations, privacy, SecAgg."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from flctl.core._payload import EventPayload, flag_field, optional_field

__all__ = [
    "EvaluationFailed",
    "EvaluationReported",
    "PrivacyCharged",
    "PrivacyRefused",
    "RoundCancelled",
    "RoundCommitted",
    "RoundFailed",
    "RoundQueued",
    "RoundRejected",
    "RoundResumed",
    "RoundStarted",
    "RoundStatus",
    "SecAggFailed",
    "SecAggStageClosed",
    "SecAggStarted",
    "SecAggUnmasked",
    "TaskSent",
    "UpdateAccepted",
    "UpdateClamped",
    "UpdateExcluded",
    "UpdateRejected",
    "UpdateScored",
    "UploadResumed",
]


@dataclass(frozen=True)
class RoundQueued(EventPayload):
    """A round is queued (the round id is the event's server_round).

    Attributes:
        admin: Who queued it (``StartRound``); written only when given.
        retry_of: For a retry, the first round of those it retries; written only when given.
        attempt: For a retry, its attempt number (1, 2, ...); written only when given.
        reason: For a retry, why the round it retries failed; written only when given.
    """

    type: ClassVar[str] = "round.queued"
    admin: str | None = optional_field()
    retry_of: int | None = optional_field()
    attempt: int | None = optional_field()
    reason: str | None = optional_field()


@dataclass(frozen=True)
class RoundStarted(EventPayload):
    """A round selected its clients and sent their tasks.

    Attributes:
        base_version: The model version it trains from.
        selected: The selected client ids.
        deadline_unix: When its training phase ends (Unix time).
        min_clients: Its quorum.
    """

    type: ClassVar[str] = "round.started"
    base_version: int
    selected: Sequence[str]
    deadline_unix: float
    min_clients: int


@dataclass(frozen=True)
class RoundResumed(EventPayload):
    """A restarted coordinator carries on with a round a stopped one left open.

    Attributes:
        selected: The selected client ids ([] when it selects again).
        accepted: The updates it already holds.
        deadline_unix: When its training phase ends (Unix time, or None); written unless it
            selects again.
        is_reselect: Whether it was stopped while selecting and selects again
            (``round.started`` follows); key ``reselect``, written only when True.
    """

    type: ClassVar[str] = "round.resumed"
    selected: Sequence[str]
    accepted: int
    deadline_unix: float | None = None
    is_reselect: bool = False

    def to_data(self) -> dict[str, Any]:
        """The event's ``data``: ``reselect: true`` instead of the deadline when reselecting."""
        data: dict[str, Any] = {"selected": list(self.selected), "accepted": self.accepted}
        if self.is_reselect:
            data["reselect"] = True
        else:
            data["deadline_unix"] = self.deadline_unix
        return data


@dataclass(frozen=True)
class RoundStatus(EventPayload):
    """A round moved to a non-terminal status.

    Attributes:
        status: ``selecting``, ``training``, ``aggregating`` or ``evaluating``.
    """

    type: ClassVar[str] = "round.status"
    status: str


@dataclass(frozen=True)
class RoundCommitted(EventPayload):
    """A round's model became the head.

    Attributes:
        model_version: The new model's version.
        metrics: The round's metrics.
        num_clients: The updates aggregated.
        duration_s: The round's duration.
        aggregate_s: The coordinator's aggregation phase (reading the updates, writing,
            hashing and storing the new model), rounded to 0.1 ms by the caller.
        aggregation: How it aggregated: ``streamed`` (FedAvg summed while the updates
            uploaded), ``incremental`` (summed as the updates arrived), ``whole`` (every update
            read once the wait ended), ``private`` or ``secure``.
        evaluate_s: Its server-side evaluation, or None when there was none (written as null).
    """

    type: ClassVar[str] = "round.committed"
    model_version: int
    metrics: Mapping[str, float]
    num_clients: int
    duration_s: float
    aggregate_s: float
    aggregation: str
    evaluate_s: float | None


@dataclass(frozen=True)
class RoundRejected(EventPayload):
    """A round's model was stored (status rejected); the validation gate kept it from the head.

    Attributes:
        model_version: The stored model's version.
        metrics: The round's finite metrics.
        num_clients: The updates aggregated.
        duration_s: The round's duration.
        reason: The validation gate's.
    """

    type: ClassVar[str] = "round.rejected"
    model_version: int
    metrics: Mapping[str, float]
    num_clients: int
    duration_s: float
    reason: str


@dataclass(frozen=True)
class _RoundEnded(EventPayload):
    """A round ended without a model.

    Attributes:
        reason: Why.
        duration_s: Its duration, or None when it never started (written as null).
    """

    reason: str
    duration_s: float | None


@dataclass(frozen=True)
class RoundFailed(_RoundEnded):
    """A round failed: no model.

    Attributes:
        reason: Why.
        duration_s: Its duration, or None when it never started (written as null).
    """

    type: ClassVar[str] = "round.failed"


@dataclass(frozen=True)
class RoundCancelled(_RoundEnded):
    """A round was cancelled: no model.

    Attributes:
        reason: Why.
        duration_s: Its duration, or None when it never started (written as null).
    """

    type: ClassVar[str] = "round.cancelled"


@dataclass(frozen=True)
class TaskSent(EventPayload):
    """A task went to a client.

    Attributes:
        task_id: The task.
        kind: ``fit`` or ``evaluate``.
        model_digest: The model it starts from.
    """

    type: ClassVar[str] = "task.sent"
    task_id: str
    kind: str
    model_digest: str


@dataclass(frozen=True)
class UpdateAccepted(EventPayload):
    """An update is on disk and counts for its round.

    Attributes:
        task_id: The task it answers.
        num_examples: The examples it claims.
        metrics: Its training metrics.
        size: Its bytes.
        digest: Its blob's digest.
        upload_id: The upload it came in.
        resumed_from: The offset its last stream started at (0: not resumed).
        codec: Its wire codec (``none``, ``zstd``).
        wire_bytes: Bytes on the wire, every stream of the upload together.
        receive_s: Receiving it, rounded to 0.1 ms by the caller.
        commit_s: Verifying and storing it, rounded to 0.1 ms by the caller.
    """

    type: ClassVar[str] = "update.accepted"
    task_id: str
    num_examples: int
    metrics: Mapping[str, float]
    size: int
    digest: str
    upload_id: str
    resumed_from: int
    codec: str
    wire_bytes: int
    receive_s: float
    commit_s: float


@dataclass(frozen=True)
class UploadResumed(EventPayload):
    """An upload carries on from where a broken stream left it.

    Attributes:
        upload_id: The upload.
        offset: Bytes the coordinator already held.
        size: The upload's size.
    """

    type: ClassVar[str] = "upload.resumed"
    upload_id: str
    offset: int
    size: int


@dataclass(frozen=True)
class UpdateRejected(EventPayload):
    """An update was refused.

    Attributes:
        task_id: The task it claimed to answer (at most 64 characters).
        reason: Why.
        is_malformed: Whether it was malformed (bad digest, size, tensors, values: no table
            but the event log has it); key ``malformed``, written only when True.
    """

    type: ClassVar[str] = "update.rejected"
    task_id: str
    reason: str
    is_malformed: bool = flag_field("malformed")


@dataclass(frozen=True)
class UpdateClamped(EventPayload):
    """An accepted update weighs less than its client claimed (``[rounds]``'s bounds).

    Attributes:
        claimed: The update's num_examples.
        used: The weight it aggregated with.
        bound: ``max_examples_per_update`` or ``max_weight_share``: the bound that lowered it.
        share: Its share of the round's total weight (rounded by the caller).
        max_examples_per_update: The configured bound.
        max_weight_share: The configured bound.
    """

    type: ClassVar[str] = "update.clamped"
    claimed: int
    used: int
    bound: str
    share: float
    max_examples_per_update: int
    max_weight_share: float


@dataclass(frozen=True)
class UpdateScored(EventPayload):
    """An accepted update's anomaly scores (Byzantine detection, docs/strategies.md).

    Emitted when the update is scored, and again with its median_distance when a whole-round
    strategy computes it at aggregation. Every key is written (null where not computed).

    Attributes:
        l2: The norm of its change, or None.
        cosine: Its cosine to the round's mean direction so far, or None.
        median_distance: Its distance to the coordinate-wise median, or None.
    """

    type: ClassVar[str] = "update.scored"
    l2: float | None
    cosine: float | None
    median_distance: float | None


@dataclass(frozen=True)
class UpdateExcluded(EventPayload):
    """The outlier rule marked an update (``[strategy] exclude_outliers``).

    Attributes:
        score: The score that tripped: ``l2``, ``cosine`` or ``median_distance``.
        value: The update's value of it.
        z: Its modified z-score in the round.
        threshold: The threshold it crossed.
        mode: ``flag`` (recorded only) or ``drop`` (left out of the aggregate).
    """

    type: ClassVar[str] = "update.excluded"
    score: str
    value: float
    z: float
    threshold: float
    mode: str


@dataclass(frozen=True)
class EvaluationReported(EventPayload):
    """A client evaluated the round's new model (``rounds.evaluate`` ``clients`` or ``both``).

    Attributes:
        task_id: The evaluate task.
        loss: Its loss.
        num_examples: The examples it evaluated on.
        metrics: Its metrics.
    """

    type: ClassVar[str] = "evaluation.reported"
    task_id: str
    loss: float
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class EvaluationFailed(EventPayload):
    """A client's evaluation of the round's new model failed, or did not arrive in time.

    Attributes:
        task_id: The evaluate task.
        reason: What its evaluate raised (one line), or why it did not arrive.
    """

    type: ClassVar[str] = "evaluation.failed"
    task_id: str
    reason: str


@dataclass(frozen=True)
class PrivacyRefused(EventPayload):
    """A round refused before it started: it would exceed ``privacy.epsilon_budget``.

    Attributes:
        reason: The refusal, one line.
        epsilon: What the round would reach.
        budget: The configured budget.
        accountant: ``rdp`` or ``pld``.
        delta: The target delta.
    """

    type: ClassVar[str] = "privacy.refused"
    reason: str
    epsilon: float
    budget: float
    accountant: str
    delta: float


@dataclass(frozen=True)
class PrivacyCharged(EventPayload):
    """A round charged to the privacy ledger.

    Attributes:
        epsilon: Epsilon after the round, under the configured accountant (RDP's when that
            one could not account for it).
        accountant: The accountant ``epsilon`` is from.
        epsilon_rdp: Epsilon under RDP.
        epsilon_pld: Epsilon under PLD, or None (written as null).
        budget: The configured budget.
        delta: The target delta.
        noise_multiplier: The round's noise multiplier (the clients', in local mode).
        mechanism: ``central`` or ``local``.
        clip_norm: The round's clipping bound.
        next_clip_norm: The next round's bound (adaptive clipping); written only when given.
    """

    type: ClassVar[str] = "privacy.charged"
    epsilon: float
    accountant: str
    epsilon_rdp: float
    epsilon_pld: float | None
    budget: float
    delta: float
    noise_multiplier: float
    mechanism: str
    clip_norm: float
    next_clip_norm: float | None = optional_field()


@dataclass(frozen=True)
class SecAggStarted(EventPayload):
    """A round's secure aggregation began: its public setup (docs/secagg.md).

    Attributes:
        participants: The selected clients, sorted.
        threshold: ``t``: how many of a client's share holders rebuild its secrets.
        num_neighbours: How many others each client shares with (``n - 1``: all).
        quantization_bits: Bits per quantized value.
        modulus_bits: 32 or 64: the masked inputs' integers.
        num_elements: The masked vector's length.
    """

    type: ClassVar[str] = "secagg.started"
    participants: Sequence[str]
    threshold: int
    num_neighbours: int
    quantization_bits: int
    modulus_bits: int
    num_elements: int


@dataclass(frozen=True)
class SecAggStageClosed(EventPayload):
    """A stage of a round's secure aggregation closed.

    Attributes:
        stage: ``advertise_keys``, ``share_keys``, ``masked_input`` or ``unmask``: the stage
            whose messages the coordinator stopped waiting for.
        live: The clients still in the protocol after it, sorted.
        dropped: Each client that left at this stage, with why (it did not answer in time, its
            message was refused, too few of its share holders remained).
    """

    type: ClassVar[str] = "secagg.stage"
    stage: str
    live: Sequence[str]
    dropped: Mapping[str, str]


@dataclass(frozen=True)
class SecAggUnmasked(EventPayload):
    """A round's masked sum was unmasked: the coordinator holds the sum, and no one update.

    Attributes:
        survivors: The clients whose masked inputs are in the sum, sorted.
        dropouts: Each client that left the protocol, with the stage it left at.
        refusals: Each client whose message was refused, with the reason.
        total_weight: The sum of the survivors' weights.
        error_bound: The largest error quantization can leave in an element of the mean.
        noise_std: With central DP, the std of the noise added to each element of the mean;
            written only when given.
    """

    type: ClassVar[str] = "secagg.unmasked"
    survivors: Sequence[str]
    dropouts: Mapping[str, str]
    refusals: Mapping[str, str]
    total_weight: float
    error_bound: float
    noise_std: float | None = optional_field()


@dataclass(frozen=True)
class SecAggFailed(EventPayload):
    """A round's secure aggregation could not go on (too few clients left to unmask, ...).

    Attributes:
        stage: The stage it failed at.
        reason: Why, one line (``round.failed`` says it too).
        dropouts: Each client that left the protocol, with the stage it left at.
    """

    type: ClassVar[str] = "secagg.failed"
    stage: str
    reason: str
    dropouts: Mapping[str, str]
