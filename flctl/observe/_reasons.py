"""Free-text refusal reasons mapped to a small, fixed set of codes (bounded metric labels).

An event's ``reason`` is written for people ("late: round 3's deadline has passed"); a
Prometheus label must take few values, or every distinct text becomes a time series of its
own. Each function here returns one of its tuple's codes, ``other`` for a text it does not
recognise.
"""

from __future__ import annotations

__all__ = [
    "REFUSAL_REASONS",
    "UPDATE_REJECTION_REASONS",
    "refusal_reason",
    "update_rejection_reason",
]

#: The ``reason`` label values of ``flctl_updates_rejected_total``.
UPDATE_REJECTION_REASONS = (
    "malformed",
    "late",
    "duplicate",
    "not_selected",
    "wrong_task",
    "round_closed",
    "stale_base",
    "refused_before",
    "other",
)

#: The ``reason`` label values of ``flctl_refusals_total``.
REFUSAL_REASONS = (
    "revoked",
    "certificate_validity",
    "session_token",
    "rate_limit",
    "role",
    "connection_limit",
    "privacy_budget",
    "other",
)

# (code, a fragment of the coordinator's wording), first match wins; the wording is the
# coordinator's own (flctl/coordinator/_intake.py, _guard.py, transport/grpc/_servicers.py).
_UPDATE_FRAGMENTS = (
    ("late", "late:"),
    ("duplicate", "duplicate:"),
    ("not_selected", "was not selected"),
    ("wrong_task", "is not this client's task"),
    ("round_closed", "is not in training"),
    ("stale_base", "the delta is relative to"),
    ("refused_before", "update was refused"),
)
_REFUSAL_FRAGMENTS = (
    ("session_token", "token"),  # before "expired": "session token expired" is this one
    ("rate_limit", "rate limit"),
    ("revoked", "revoked"),
    ("certificate_validity", "expired"),
    ("certificate_validity", "not valid until"),
    ("role", "may not call"),
)


def update_rejection_reason(reason: str, *, is_malformed: bool = False) -> str:
    """The code of an ``update.rejected`` event's reason.

    Args:
        reason: The event's ``reason``.
        is_malformed: Its ``malformed`` flag: the update itself was bad (digest, size,
            tensors, values), whatever the words.

    Returns:
        One of :data:`UPDATE_REJECTION_REASONS`.
    """
    if is_malformed:
        return "malformed"
    text = reason.lower()
    for code, fragment in _UPDATE_FRAGMENTS:
        if fragment in text:
            return code
    return "other"


def refusal_reason(reason: str, rpc: str = "") -> str:
    """The code of a ``security.refused`` event's reason.

    Args:
        reason: The event's ``reason``.
        rpc: The call refused; ``connect`` is a connection closed or refused by a bound
            before any identity.

    Returns:
        One of :data:`REFUSAL_REASONS` (never ``privacy_budget``: that one is counted from
        ``privacy.refused`` events).
    """
    if rpc == "connect":
        return "connection_limit"
    text = reason.lower()
    for code, fragment in _REFUSAL_FRAGMENTS:
        if fragment in text:
            return code
    return "other"
