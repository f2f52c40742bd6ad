"""``round start --wait``'s exit code from the rounds' statuses."""

from __future__ import annotations

from typing import Any

from flctl.cli._rounds import rounds_exit_code
from flctl.core.errors import RoundCancelledError, RoundFailedError, RoundRejectedError


def rnd(status: str, reason: str = "") -> dict[str, Any]:
    return {"round": 1, "status": status, "reason": reason}


def test_a_rejected_round_has_its_own_exit_code() -> None:
    committed, rejected = rnd("committed"), rnd("rejected", "accuracy regressed")
    assert rounds_exit_code([committed, committed]) == 0
    assert rounds_exit_code([committed, rejected]) == RoundRejectedError.exit_code == 83
    # a failure or a cancellation outranks a rejection
    assert rounds_exit_code([rejected, rnd("cancelled")]) == RoundCancelledError.exit_code
    assert rounds_exit_code([rejected, rnd("failed", "x")]) == RoundFailedError.exit_code
