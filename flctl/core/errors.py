"""The one error hierarchy of flctl, each class with a user-facing message and an exit code.

```
FlctlError                                  1
├─ ConfigError                             10
│  ├─ ProjectNotFoundError                 11
│  └─ ProjectExistsError                   12
├─ SecurityError                           20
│  ├─ CertificateError                     21
│  ├─ AuthenticationError                  22
│  ├─ PermissionDeniedError                23
│  └─ SecAggError                          24
│     ├─ ShareRefusedError                 25
│     └─ SecAggThresholdError              26
├─ TransportError                          30
│  ├─ ConnectError                         31
│  │  └─ StandbyError                      37
│  ├─ DeadlineExceededError                32
│  ├─ PeerRejectedError                    33
│  ├─ ProtocolMismatchError                34
│  ├─ ResourceExhaustedError               35
│  └─ SessionConflictError                 36
├─ InvalidInputError                       40
│  ├─ LimitExceededError                   41
│  └─ IntegrityError                       42
├─ AggregationError                        50
│  ├─ NotEnoughUpdatesError                51
│  └─ InconsistentUpdatesError             52
├─ PrivacyError                            60
│  └─ BudgetExhaustedError                 61
├─ StoreError                              70
│  ├─ NotFoundError                        71
│  ├─ SchemaMismatchError                  72
│  ├─ ConflictError                        73
│  ├─ CorruptStoreError                    74
│  ├─ StoreLostError                       75
│  ├─ StoreUnavailableError                76
│  ├─ FencedError                          77
│  └─ StorageFullError                     78
├─ RoundError                              80
│  ├─ RoundFailedError                     81
│  ├─ RoundCancelledError                  82
│  └─ RoundRejectedError                   83
└─ TaskError                               90
```

Exit codes 0 (success), 1 (an unexpected error, traceback in a log file) and 2 (command-line
usage) are the CLI's own. Every subclass must set its own ``exit_code``; defining one that does
not is a ``TypeError`` at import time, so a forgotten code can never ship.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AggregationError",
    "AuthenticationError",
    "BudgetExhaustedError",
    "CertificateError",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "CorruptStoreError",
    "DeadlineExceededError",
    "FencedError",
    "FlctlError",
    "InconsistentUpdatesError",
    "IntegrityError",
    "InvalidInputError",
    "LimitExceededError",
    "NotEnoughUpdatesError",
    "NotFoundError",
    "PeerRejectedError",
    "PermissionDeniedError",
    "PrivacyError",
    "ProjectExistsError",
    "ProjectNotFoundError",
    "ProtocolMismatchError",
    "ResourceExhaustedError",
    "RoundCancelledError",
    "RoundError",
    "RoundFailedError",
    "RoundRejectedError",
    "SchemaMismatchError",
    "SecAggError",
    "SecAggThresholdError",
    "SecurityError",
    "SessionConflictError",
    "ShareRefusedError",
    "StandbyError",
    "StorageFullError",
    "StoreError",
    "StoreLostError",
    "StoreUnavailableError",
    "TaskError",
    "TransportError",
    "all_error_classes",
]


class FlctlError(Exception):
    """Base of every error flctl raises on purpose.

    Args:
        message: What went wrong, in words a user can act on.
        hint: Optional next step ("run `flctl certs gen` first").
        details: Optional machine-readable context, included in ``--json`` output.
    """

    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "error"

    def __init__(
        self, message: str, *, hint: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "exit_code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must set its own exit_code")
        if "code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must set its own code")

    def to_dict(self) -> dict[str, Any]:
        """Return the error as the ``{"code", "exit_code", "message", ...}`` JSON object."""
        out: dict[str, Any] = {
            "code": self.code,
            "exit_code": self.exit_code,
            "message": self.message,
        }
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        return out


class ConfigError(FlctlError):
    """A configuration file or option is missing or wrong."""

    exit_code = 10
    code = "config"


class ProjectNotFoundError(ConfigError):
    """No flctl.toml in this folder or any parent."""

    exit_code = 11
    code = "project_not_found"


class ProjectExistsError(ConfigError):
    """A project folder would be overwritten."""

    exit_code = 12
    code = "project_exists"


class SecurityError(FlctlError):
    """A security check failed."""

    exit_code = 20
    code = "security"


class CertificateError(SecurityError):
    """A certificate or key is missing, malformed, expired or not from our CA."""

    exit_code = 21
    code = "certificate"


class AuthenticationError(SecurityError):
    """The peer could not prove who it is (handshake refused, bad or expired token)."""

    exit_code = 22
    code = "unauthenticated"


class PermissionDeniedError(SecurityError):
    """The peer is known but not allowed to do this (wrong role, revoked)."""

    exit_code = 23
    code = "permission_denied"


class SecAggError(SecurityError):
    """A secure-aggregation (SecAgg+) message broke the protocol, or a round cannot be unmasked."""

    exit_code = 24
    code = "secagg"


class ShareRefusedError(SecAggError):
    """An encrypted SecAgg share was tampered with, malformed or addressed to another client."""

    exit_code = 25
    code = "share_refused"


class SecAggThresholdError(SecAggError):
    """Fewer SecAgg clients remain than the reconstruction threshold: the sum cannot be unmasked."""

    exit_code = 26
    code = "secagg_threshold"


class TransportError(FlctlError):
    """Talking to the peer failed."""

    exit_code = 30
    code = "transport"


class ConnectError(TransportError):
    """The peer could not be reached."""

    exit_code = 31
    code = "unavailable"


class DeadlineExceededError(TransportError):
    """The peer did not answer in time."""

    exit_code = 32
    code = "deadline_exceeded"


class PeerRejectedError(TransportError):
    """The peer answered with a refusal that fits no narrower class."""

    exit_code = 33
    code = "rejected"


class ProtocolMismatchError(TransportError):
    """The peers speak different protocol versions or run different tasks."""

    exit_code = 34
    code = "protocol_mismatch"


class ResourceExhaustedError(TransportError):
    """A rate limit or a capacity bound was hit."""

    exit_code = 35
    code = "resource_exhausted"


class SessionConflictError(TransportError):
    """This identity already has a live session from another ``flctl join`` process."""

    exit_code = 36
    code = "session_conflict"


class StandbyError(ConnectError):
    """This coordinator stands by: the leader serves (clients given several addresses go on)."""

    exit_code = 37
    code = "standby"


class InvalidInputError(FlctlError):
    """Inbound data is malformed: wrong shape, dtype, NaN, bad digest, bad field."""

    exit_code = 40
    code = "invalid_argument"


class LimitExceededError(InvalidInputError):
    """Inbound data is larger than allowed (chunk, blob, map, string)."""

    exit_code = 41
    code = "limit_exceeded"


class IntegrityError(InvalidInputError):
    """Bytes do not hash to the digest they claim."""

    exit_code = 42
    code = "integrity"


class AggregationError(FlctlError):
    """Updates could not be aggregated."""

    exit_code = 50
    code = "aggregation"


class NotEnoughUpdatesError(AggregationError):
    """Fewer accepted updates than the round's quorum."""

    exit_code = 51
    code = "not_enough_updates"


class InconsistentUpdatesError(AggregationError):
    """Updates disagree on tensor names, shapes or dtypes."""

    exit_code = 52
    code = "inconsistent_updates"


class PrivacyError(FlctlError):
    """A differential-privacy setting or check failed."""

    exit_code = 60
    code = "privacy"


class BudgetExhaustedError(PrivacyError):
    """The next round would exceed the configured epsilon budget."""

    exit_code = 61
    code = "budget_exhausted"
    reason_prefix = "privacy budget exhausted"
    """How the reason of a round the coordinator refused for its budget begins."""


class StoreError(FlctlError):
    """The state store could not be read or written."""

    exit_code = 70
    code = "store"


class NotFoundError(StoreError):
    """A model version, round, client or blob does not exist."""

    exit_code = 71
    code = "not_found"


class SchemaMismatchError(StoreError):
    """The state database was written by an incompatible flctl."""

    exit_code = 72
    code = "schema_mismatch"


class ConflictError(StoreError):
    """The state changed under us, or the store is held by another coordinator."""

    exit_code = 73
    code = "conflict"


class CorruptStoreError(StoreError):
    """The state database is damaged (flipped bytes, a torn file): restore it from a backup."""

    exit_code = 74
    code = "store_corrupt"


class StoreLostError(StoreError):
    """The state folder held a store (marker, blobs) but its database is missing or empty."""

    exit_code = 75
    code = "store_lost"


class StoreUnavailableError(StoreError):
    """The state database cannot be reached, or the connection to it was lost."""

    exit_code = 76
    code = "store_unavailable"


class FencedError(StoreError):
    """Another coordinator took over the shared state: this one may no longer write to it."""

    exit_code = 77
    code = "fenced"


class StorageFullError(StoreError):
    """The coordinator's disk has no room left for what it must write: free space, try later."""

    exit_code = 78
    code = "storage_full"


class RoundError(FlctlError):
    """A round did not commit."""

    exit_code = 80
    code = "round"


class RoundFailedError(RoundError):
    """A round ended as failed."""

    exit_code = 81
    code = "round_failed"


class RoundCancelledError(RoundError):
    """A round was cancelled."""

    exit_code = 82
    code = "round_cancelled"


class RoundRejectedError(RoundError):
    """A round's aggregate was refused by the validation gate: stored, but not made head."""

    exit_code = 83
    code = "round_rejected"


class TaskError(FlctlError):
    """The user's task code (task.py) failed to load or raised."""

    exit_code = 90
    code = "task"


def all_error_classes() -> list[type[FlctlError]]:
    """Return FlctlError and every subclass flctl defines, depth first (docs, meta-tests)."""
    out: list[type[FlctlError]] = []
    stack: list[type[FlctlError]] = [FlctlError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("flctl."):
            out.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return out
