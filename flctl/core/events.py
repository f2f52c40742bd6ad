"""Event types of the persisted event log, their typed payloads, and the shape of one event.

The coordinator appends an :class:`Event` for every state change; ``round watch``, the live
panels and ``--json`` consumers read the same log (resumable by ``seq``). Each type has a
payload class (:class:`EventPayload`: a frozen dataclass, one per type, whose docstring
documents the keys) that the coordinator emits and that :meth:`EventPayload.to_data` turns
into the event's ``data``; readers read ``Event.data`` and must ignore keys they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flctl.core._model_payloads import (
    ModelCorrupt,
    ModelCreated,
    ModelImported,
    ModelRejected,
    ModelRollback,
    ModelRollbackDeferred,
    ModelRollbackFailed,
    ModelTagged,
)
from flctl.core._payload import EventPayload
from flctl.core._round_payloads import (
    EvaluationFailed,
    EvaluationReported,
    PrivacyCharged,
    PrivacyRefused,
    RoundCancelled,
    RoundCommitted,
    RoundFailed,
    RoundQueued,
    RoundRejected,
    RoundResumed,
    RoundStarted,
    RoundStatus,
    SecAggFailed,
    SecAggStageClosed,
    SecAggStarted,
    SecAggUnmasked,
    TaskSent,
    UpdateAccepted,
    UpdateClamped,
    UpdateExcluded,
    UpdateRejected,
    UpdateScored,
    UploadResumed,
)
from flctl.core._service_payloads import (
    ClientEvicted,
    ClientJoined,
    ClientLeft,
    ClientState,
    CoordinatorDraining,
    CoordinatorStarted,
    CoordinatorStopped,
    CoordinatorWarning,
    IdentityRevoked,
    SecurityRefused,
    StorageFull,
)

__all__ = [
    "ADMIN_EVENT_TYPES",
    "CLIENT_EVICTED",
    "CLIENT_JOINED",
    "CLIENT_LEFT",
    "CLIENT_STATE",
    "COORDINATOR_DRAINING",
    "COORDINATOR_STARTED",
    "COORDINATOR_STOPPED",
    "COORDINATOR_WARNING",
    "ClientEvicted",
    "ClientJoined",
    "ClientLeft",
    "ClientState",
    "CoordinatorDraining",
    "CoordinatorStarted",
    "CoordinatorStopped",
    "CoordinatorWarning",
    "EVALUATION_FAILED",
    "EVALUATION_REPORTED",
    "EVENT_TYPES",
    "EvaluationFailed",
    "EvaluationReported",
    "Event",
    "EventPayload",
    "IDENTITY_REVOKED",
    "IdentityRevoked",
    "MODEL_CORRUPT",
    "MODEL_CREATED",
    "MODEL_IMPORTED",
    "MODEL_REJECTED",
    "MODEL_ROLLBACK",
    "MODEL_ROLLBACK_DEFERRED",
    "MODEL_ROLLBACK_FAILED",
    "MODEL_TAGGED",
    "ModelCorrupt",
    "ModelCreated",
    "ModelImported",
    "ModelRejected",
    "ModelRollback",
    "ModelRollbackDeferred",
    "ModelRollbackFailed",
    "ModelTagged",
    "PHASE_EVENT_TYPES",
    "PRIVACY_CHARGED",
    "PRIVACY_REFUSED",
    "PrivacyCharged",
    "PrivacyRefused",
    "ROUND_CANCELLED",
    "ROUND_COMMITTED",
    "ROUND_FAILED",
    "ROUND_QUEUED",
    "ROUND_REJECTED",
    "ROUND_RESUMED",
    "ROUND_STARTED",
    "ROUND_STATUS",
    "RoundCancelled",
    "RoundCommitted",
    "RoundFailed",
    "RoundQueued",
    "RoundRejected",
    "RoundResumed",
    "RoundStarted",
    "RoundStatus",
    "SECURITY_REFUSED",
    "SEC_AGG_FAILED",
    "SEC_AGG_STAGE_CLOSED",
    "SEC_AGG_STARTED",
    "SEC_AGG_UNMASKED",
    "STORAGE_FULL",
    "SecAggFailed",
    "SecAggStageClosed",
    "SecAggStarted",
    "SecAggUnmasked",
    "SecurityRefused",
    "StorageFull",
    "TASK_SENT",
    "TERMINAL_ROUND_STATUSES",
    "TaskSent",
    "UPDATE_ACCEPTED",
    "UPDATE_CLAMPED",
    "UPDATE_EXCLUDED",
    "UPDATE_REJECTED",
    "UPDATE_SCORED",
    "UPLOAD_RESUMED",
    "UpdateAccepted",
    "UpdateClamped",
    "UpdateExcluded",
    "UpdateRejected",
    "UpdateScored",
    "UploadResumed",
    "round_phases",
]

# Each type's string is its payload class's ``type``; the class documents the data's keys.

#: A coordinator is serving (:class:`CoordinatorStarted`).
COORDINATOR_STARTED = CoordinatorStarted.type
#: A coordinator stopped (:class:`CoordinatorStopped`).
COORDINATOR_STOPPED = CoordinatorStopped.type
#: A coordinator gives the running round time to end (:class:`CoordinatorDraining`).
COORDINATOR_DRAINING = CoordinatorDraining.type
#: Something for the operator: an expiring certificate, a rollback policy that could not act
#: (:class:`CoordinatorWarning`).
COORDINATOR_WARNING = CoordinatorWarning.type
#: A client opened a session (:class:`ClientJoined`).
CLIENT_JOINED = ClientJoined.type
#: A client's session ended (:class:`ClientLeft`).
CLIENT_LEFT = ClientLeft.type
#: An admin evicted a client (:class:`ClientEvicted`).
CLIENT_EVICTED = ClientEvicted.type
#: A client's state or progress changed (:class:`ClientState`).
CLIENT_STATE = ClientState.type
#: A round is queued, or a failed one queued again (:class:`RoundQueued`).
ROUND_QUEUED = RoundQueued.type
#: A round selected its clients (:class:`RoundStarted`).
ROUND_STARTED = RoundStarted.type
#: A restarted coordinator carries on with an open round (:class:`RoundResumed`).
ROUND_RESUMED = RoundResumed.type
#: A round moved to a non-terminal status (:class:`RoundStatus`).
ROUND_STATUS = RoundStatus.type
#: A task went to a client (:class:`TaskSent`).
TASK_SENT = TaskSent.type
#: An update is on disk and counts (:class:`UpdateAccepted`).
UPDATE_ACCEPTED = UpdateAccepted.type
#: An upload carries on from a broken stream (:class:`UploadResumed`).
UPLOAD_RESUMED = UploadResumed.type
#: An update was refused (:class:`UpdateRejected`).
UPDATE_REJECTED = UpdateRejected.type
#: An accepted update weighs less than its client claimed (:class:`UpdateClamped`).
UPDATE_CLAMPED = UpdateClamped.type
#: An accepted update's anomaly scores (:class:`UpdateScored`).
UPDATE_SCORED = UpdateScored.type
#: An update the outlier rule marked (:class:`UpdateExcluded`).
UPDATE_EXCLUDED = UpdateExcluded.type
#: A client evaluated the round's new model (:class:`EvaluationReported`).
EVALUATION_REPORTED = EvaluationReported.type
#: A client's evaluation failed or did not arrive in time (:class:`EvaluationFailed`).
EVALUATION_FAILED = EvaluationFailed.type
#: A round's model became the head (:class:`RoundCommitted`).
ROUND_COMMITTED = RoundCommitted.type
#: A round's model was stored, but the validation gate kept it from the head
#: (:class:`RoundRejected`).
ROUND_REJECTED = RoundRejected.type
#: A round failed (:class:`RoundFailed`).
ROUND_FAILED = RoundFailed.type
#: A round was cancelled (:class:`RoundCancelled`).
ROUND_CANCELLED = RoundCancelled.type
#: A model version was written and became the head (:class:`ModelCreated`).
MODEL_CREATED = ModelCreated.type
#: A certificate (or every one of an identity) is revoked (:class:`IdentityRevoked`).
IDENTITY_REVOKED = IdentityRevoked.type
#: The head moved back to an old version's weights (:class:`ModelRollback`).
MODEL_ROLLBACK = ModelRollback.type
#: A rollback waits for the open round (:class:`ModelRollbackDeferred`).
MODEL_ROLLBACK_DEFERRED = ModelRollbackDeferred.type
#: A deferred rollback could not apply (:class:`ModelRollbackFailed`).
MODEL_ROLLBACK_FAILED = ModelRollbackFailed.type
#: A call or connection refused (:class:`SecurityRefused`).
SECURITY_REFUSED = SecurityRefused.type
#: A round refused because it would exceed ``privacy.epsilon_budget``
#: (:class:`PrivacyRefused`).
PRIVACY_REFUSED = PrivacyRefused.type
#: A round charged to the privacy ledger (:class:`PrivacyCharged`).
PRIVACY_CHARGED = PrivacyCharged.type
#: A round's secure aggregation began (:class:`SecAggStarted`).
SEC_AGG_STARTED = SecAggStarted.type
#: A stage of a round's secure aggregation closed, and who left at it (:class:`SecAggStageClosed`).
SEC_AGG_STAGE_CLOSED = SecAggStageClosed.type
#: A round's masked sum was unmasked (:class:`SecAggUnmasked`).
SEC_AGG_UNMASKED = SecAggUnmasked.type
#: A round's secure aggregation could not go on (:class:`SecAggFailed`).
SEC_AGG_FAILED = SecAggFailed.type
#: A tag names a (new) version (:class:`ModelTagged`).
MODEL_TAGGED = ModelTagged.type
#: A model file imported as a version, by ``flctl models import`` (:class:`ModelImported`).
MODEL_IMPORTED = ModelImported.type
#: The head model's blob is damaged or missing; rounds are refused (:class:`ModelCorrupt`).
MODEL_CORRUPT = ModelCorrupt.type
#: An aggregate the validation gate kept from the head (:class:`ModelRejected`).
MODEL_REJECTED = ModelRejected.type
#: The coordinator's disk had no room for a write (:class:`StorageFull`).
STORAGE_FULL = StorageFull.type

#: A round ends committed (its model is the head), rejected (its model was stored but the
#: validation gate kept it from the head), failed or cancelled (no model).
TERMINAL_ROUND_STATUSES = frozenset({"committed", "rejected", "failed", "cancelled"})

#: The events that mark a round's phases (:func:`round_phases`).
PHASE_EVENT_TYPES = frozenset(
    {
        ROUND_STARTED,
        ROUND_RESUMED,
        ROUND_STATUS,
        ROUND_COMMITTED,
        ROUND_REJECTED,
        ROUND_FAILED,
        ROUND_CANCELLED,
    }
)


def round_phases(events: list[Event]) -> list[tuple[str, float]]:
    """How long a round spent in each phase, in order, from its events (oldest first).

    A phase lasts from the event that entered it to the next one; the phases repeated by a
    restart (``round.resumed``) add up. Events other than :data:`PHASE_EVENT_TYPES` are skipped.
    """
    marks: list[tuple[str, float]] = []
    for event in events:
        if event.type == ROUND_STARTED or event.type == ROUND_RESUMED:
            marks.append(("training", event.time))
        elif event.type == ROUND_STATUS:
            marks.append((str((event.data or {}).get("status", "?")), event.time))
        elif event.type in PHASE_EVENT_TYPES:
            marks.append((event.type.split(".", 1)[1], event.time))
    spans: list[tuple[str, float]] = []
    for (name, start), (_, end) in zip(marks, marks[1:], strict=False):
        seconds = max(0.0, end - start)
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1] + seconds)
        else:
            spans.append((name, seconds))
    return spans


#: Every event type flctl writes (readers expand a prefix such as ``round`` into these).
EVENT_TYPES = frozenset(
    {
        COORDINATOR_STARTED,
        COORDINATOR_STOPPED,
        COORDINATOR_DRAINING,
        COORDINATOR_WARNING,
        CLIENT_JOINED,
        CLIENT_LEFT,
        CLIENT_EVICTED,
        CLIENT_STATE,
        ROUND_QUEUED,
        ROUND_STARTED,
        ROUND_RESUMED,
        ROUND_STATUS,
        TASK_SENT,
        UPDATE_ACCEPTED,
        UPLOAD_RESUMED,
        UPDATE_REJECTED,
        UPDATE_CLAMPED,
        UPDATE_SCORED,
        UPDATE_EXCLUDED,
        EVALUATION_REPORTED,
        EVALUATION_FAILED,
        ROUND_COMMITTED,
        ROUND_REJECTED,
        ROUND_FAILED,
        ROUND_CANCELLED,
        MODEL_CREATED,
        IDENTITY_REVOKED,
        MODEL_ROLLBACK,
        MODEL_ROLLBACK_DEFERRED,
        MODEL_ROLLBACK_FAILED,
        SECURITY_REFUSED,
        PRIVACY_REFUSED,
        PRIVACY_CHARGED,
        SEC_AGG_STARTED,
        SEC_AGG_STAGE_CLOSED,
        SEC_AGG_UNMASKED,
        SEC_AGG_FAILED,
        MODEL_TAGGED,
        MODEL_IMPORTED,
        MODEL_CORRUPT,
        MODEL_REJECTED,
        STORAGE_FULL,
    }
)

#: Events that record an operator's action, with the operator's identity in ``admin`` or
#: ``author`` ("local" for a change made on the state folder with no coordinator running): the
#: audit trail (``flctl events --type admin``, the dashboard's events page).
ADMIN_EVENT_TYPES = frozenset(
    {
        ROUND_QUEUED,
        IDENTITY_REVOKED,
        MODEL_ROLLBACK,
        MODEL_ROLLBACK_DEFERRED,
        MODEL_TAGGED,
        MODEL_IMPORTED,
        ROUND_CANCELLED,
        CLIENT_EVICTED,
    }
)


@dataclass(frozen=True)
class Event:
    """One entry of the event log.

    Attributes:
        seq: Position in the log, from 1, gap-free per store.
        time: Unix time the coordinator recorded it.
        type: One of the constants in this module.
        server_round: The round it concerns, or 0.
        client_id: The client it concerns, or "".
        data: Type-specific details (JSON-serialisable).
    """

    seq: int
    time: float
    type: str
    server_round: int = 0
    client_id: str = ""
    data: dict[str, Any] = field(default_factory=dict)
