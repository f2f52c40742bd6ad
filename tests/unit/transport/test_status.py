import random

import grpc
import pytest

from flctl.core.errors import (
    AuthenticationError,
    CertificateError,
    ConnectError,
    FlctlError,
    IntegrityError,
    LimitExceededError,
    ProtocolMismatchError,
    SessionConflictError,
    all_error_classes,
)
from flctl.transport import Backoff
from flctl.transport.grpc import (
    STATUS_TO_ERROR,
    error_metadata,
    status_for,
    translate_rpc_error,
)


def test_every_status_code_is_mapped() -> None:
    assert set(STATUS_TO_ERROR) == set(grpc.StatusCode)


def test_every_error_class_has_a_status() -> None:
    for cls in all_error_classes():
        assert isinstance(status_for(cls("x")), grpc.StatusCode)


class FakeRpcError(grpc.RpcError):
    """A stand-in for the error grpc raises; only the three accessors matter."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


@pytest.mark.parametrize(
    ("code", "details", "trailing", "cls"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", (), ConnectError),
        (
            grpc.StatusCode.UNAVAILABLE,
            "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED",
            (),
            CertificateError,
        ),
        (grpc.StatusCode.UNAUTHENTICATED, "token expired", (), AuthenticationError),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "model differs",
            (("flctl-error", "protocol_mismatch"),),
            ProtocolMismatchError,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too big",
            (("flctl-error", "limit_exceeded"),),
            LimitExceededError,
        ),
        (grpc.StatusCode.DATA_LOSS, "digest", (), IntegrityError),
    ],
)
def test_translate(
    code: grpc.StatusCode, details: str, trailing: tuple, cls: type[FlctlError]
) -> None:
    err = translate_rpc_error(FakeRpcError(code, details, trailing))
    assert type(err) is cls
    assert details in err.message


@pytest.mark.parametrize(
    ("details", "message", "hint"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: "
            "ipv4:127.0.0.1:7070: Connection refused",
            "no coordinator at 127.0.0.1:7070 yet (connection refused)",
            "is `flctl serve` running there?",
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: "
            "ipv6:%5B::1%5D:7070: Connection refused",
            "no coordinator at [::1]:7070 yet (connection refused)",
            "is `flctl serve` running there?",
        ),
        (
            "DNS resolution failed for nosuch.invalid:7070: C-ares status is not ARES_SUCCESS",
            "cannot resolve the coordinator's host name (nosuch.invalid:7070)",
            "check the host name",
        ),
    ],
)
def test_unreachable_is_said_in_flctl_words(details: str, message: str, hint: str) -> None:
    err = translate_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details))
    assert type(err) is ConnectError
    assert err.message == message
    assert err.hint is not None and hint in err.hint
    assert err.details == {"grpc": details}  # gRPC's own words stay for --json and debugging


def test_hint_and_details_cross_the_wire() -> None:
    sent = SessionConflictError(
        "c1 is joined elsewhere", hint="stop it — or --replace", details={"retry_after_s": 2.5}
    )
    err = translate_rpc_error(
        FakeRpcError(grpc.StatusCode.ALREADY_EXISTS, sent.message, error_metadata(sent))
    )
    assert type(err) is SessionConflictError
    assert (err.message, err.hint, err.details) == (sent.message, sent.hint, sent.details)
    assert all(value.isascii() for _, value in error_metadata(sent))  # metadata is ASCII only


def test_round_trip_through_status_and_code() -> None:
    for cls in all_error_classes():
        err = translate_rpc_error(
            FakeRpcError(status_for(cls("m")), "m", (("flctl-error", cls.code),))
        )
        assert type(err) is cls


def test_backoff_grows_capped_with_jitter() -> None:
    backoff = Backoff(initial=0.5, factor=2, cap=10, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(0.25 <= d <= 10 for d in delays)
    assert max(delays[-4:]) <= 10 and min(delays[-4:]) >= 5
    assert delays[0] <= 0.5
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    with pytest.raises(ValueError, match="invalid backoff"):
        Backoff(initial=0)
