"""Event types of the persisted event log, and the shape of one event.

The coordinator appends an :class:`Event` for every state change; ``round watch``, the live
panels and ``--json`` consumers read the same log (resumable by ``seq``). ``data`` holds the
details each type documents below; readers must ignore keys they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLIENT_EVICTED",
    "CLIENT_JOINED",
    "CLIENT_LEFT",
    "CLIENT_STATE",
    "COORDINATOR_DRAINING",
    "COORDINATOR_STARTED",
    "COORDINATOR_STOPPED",
    "COORDINATOR_WARNING",
    "EVALUATION_FAILED",
    "EVALUATION_REPORTED",
    "Event",
    "IDENTITY_REVOKED",
    "MODEL_CORRUPT",
    "MODEL_CREATED",
    "MODEL_IMPORTED",
    "MODEL_REJECTED",
    "MODEL_ROLLBACK",
    "MODEL_ROLLBACK_DEFERRED",
    "MODEL_ROLLBACK_FAILED",
    "MODEL_TAGGED",
    "PRIVACY_CHARGED",
    "PRIVACY_REFUSED",
    "ROUND_CANCELLED",
    "ROUND_COMMITTED",
    "ROUND_FAILED",
    "ROUND_QUEUED",
    "ROUND_REJECTED",
    "ROUND_RESUMED",
    "ROUND_STARTED",
    "ROUND_STATUS",
    "SECURITY_REFUSED",
    "STORAGE_FULL",
    "TASK_SENT",
    "TERMINAL_ROUND_STATUSES",
    "UPDATE_ACCEPTED",
    "UPDATE_CLAMPED",
    "UPDATE_EXCLUDED",
    "UPDATE_REJECTED",
    "UPDATE_SCORED",
    "UPLOAD_RESUMED",
]

#: data: address, pid, state_dir, head_version
COORDINATOR_STARTED = "coordinator.started"
#: data: reason
COORDINATOR_STOPPED = "coordinator.stopped"
#: data: timeout_s, server_round (the round given that long to end, or null)
COORDINATOR_DRAINING = "coordinator.draining"
#: data: message, and what it is about (certificate, not_after, days_left for an expiring
#: certificate)
COORDINATOR_WARNING = "coordinator.warning"
#: data: session_id
CLIENT_JOINED = "client.joined"
#: data: reason
CLIENT_LEFT = "client.left"
#: data: admin (who evicted it), reason
CLIENT_EVICTED = "client.evicted"
#: data: state (idle | downloading | training | uploading | offline), progress (0..1); while
#: transferring also bytes_done, bytes_total, bytes_per_s
CLIENT_STATE = "client.state"
#: data: {} (the round id is the event's server_round); a retry also has retry_of (the failed
#: round), attempt and reason
ROUND_QUEUED = "round.queued"
#: data: base_version, selected (client ids), deadline_unix, min_clients
ROUND_STARTED = "round.started"
#: data: selected (client ids), accepted (updates already held), deadline_unix; or, for a
#: round stopped while selecting, reselect: true (it selects again; round.started follows)
ROUND_RESUMED = "round.resumed"
#: data: status (selecting | training | aggregating | evaluating)
ROUND_STATUS = "round.status"
#: data: task_id, kind, model_digest
TASK_SENT = "task.sent"
#: data: task_id, num_examples, metrics, size, digest, upload_id, resumed_from
UPDATE_ACCEPTED = "update.accepted"
#: data: upload_id, offset (bytes the coordinator already held), size
UPLOAD_RESUMED = "upload.resumed"
#: data: task_id, reason
UPDATE_REJECTED = "update.rejected"
#: data: claimed (the update's num_examples), used (the weight it aggregated with), bound
#: ("max_examples_per_update" or "max_weight_share"), share (of the round's total weight),
#: max_examples_per_update, max_weight_share; an accepted update that weighs less than its
#: client claimed
UPDATE_CLAMPED = "update.clamped"
#: data: l2, cosine, median_distance (each a number, or null where it was not computed); an
#: accepted update's anomaly scores (Byzantine detection, docs/strategies.md). Emitted when
#: the update is scored, and again with its median_distance when a whole-round strategy
#: computes it at aggregation
UPDATE_SCORED = "update.scored"
#: data: score ("l2", "cosine" or "median_distance": the one that tripped), value, z (its
#: modified z-score in the round), threshold, mode ("flag": recorded only; "drop": left out of
#: the aggregate); an update the outlier rule marked ([strategy] exclude_outliers)
UPDATE_EXCLUDED = "update.excluded"
#: a client evaluated the round's new model (rounds.evaluate "clients" or "both"); data:
#: task_id, loss, num_examples, metrics
EVALUATION_REPORTED = "evaluation.reported"
#: a client's evaluation of the round's new model failed, or did not arrive in time; data:
#: task_id, reason (what its evaluate raised, one line)
EVALUATION_FAILED = "evaluation.failed"
#: data: model_version, metrics, num_clients, duration_s
ROUND_COMMITTED = "round.committed"
#: data: model_version (stored, status rejected; the head did not move), metrics, num_clients,
#: duration_s, reason (the validation gate's)
ROUND_REJECTED = "round.rejected"
#: data: reason, duration_s
ROUND_FAILED = "round.failed"
#: data: reason, duration_s
ROUND_CANCELLED = "round.cancelled"
#: data: version, digest, kind, parent, metrics
MODEL_CREATED = "model.created"
#: data: serial (lower-case hex, or null for every certificate), reason, author (client_id: who)
IDENTITY_REVOKED = "identity.revoked"
#: data: version, digest, source (the version restored), previous_head, author, reason
MODEL_ROLLBACK = "model.rollback"
#: data: source (the version to restore), digest, server_round (the open round it waits for),
#: author, reason
MODEL_ROLLBACK_DEFERRED = "model.rollback_deferred"
#: data: source, server_round, author, reason, error (a deferred rollback that could not apply)
MODEL_ROLLBACK_FAILED = "model.rollback_failed"
#: data: identity, reason, rpc, serial (the caller's certificate serial, hex, or null); a call
#: refused because its certificate is revoked
SECURITY_REFUSED = "security.refused"
#: data: reason, epsilon (what the round would reach), budget, accountant, delta; a round
#: refused before it started because it would exceed ``privacy.epsilon_budget``
PRIVACY_REFUSED = "privacy.refused"
#: data: epsilon (after the round, under the configured accountant), epsilon_rdp, epsilon_pld,
#: budget, accountant, delta, noise_multiplier; a round charged to the privacy ledger
PRIVACY_CHARGED = "privacy.charged"
#: data: tag, version, previous (the version it named before, or None), author
MODEL_TAGGED = "model.tagged"
#: data: version, digest, parent, head (whether it became head), file, author
MODEL_IMPORTED = "model.imported"
#: data: version, digest, path, problem, rollback_to (the newest intact version, or null),
#: reason; a head model whose blob no longer hashes to its digest (or is missing): it is not
#: served, and rounds are refused with ``reason`` until the head is intact again
MODEL_CORRUPT = "model.corrupt"
#: data: version, digest, parent, metrics, reason, check (the check that failed: "finite" or
#: "metric"), metric, value, reference (the reference version's value), reference_version,
#: against, max_regression (each null where it does not apply); an aggregate the validation
#: gate kept from becoming head (docs/registry.md)
MODEL_REJECTED = "model.rejected"

#: data: path, free_bytes, needed_bytes, what (the write that did not fit: "upload", ...);
#: the coordinator's disk had no room: the write was refused and nothing half-written kept
STORAGE_FULL = "storage.full"

#: A round ends committed (its model is the head), rejected (its model was stored but the
#: validation gate kept it from the head), failed or cancelled (no model).
TERMINAL_ROUND_STATUSES = frozenset({"committed", "rejected", "failed", "cancelled"})


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
