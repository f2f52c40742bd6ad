"""Payloads of the coordinator's own events, its security refusals and its clients' sessions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from flctl.core._payload import EventPayload, flag_field, optional_field, renamed

__all__ = [
    "ClientEvicted",
    "ClientJoined",
    "ClientLeft",
    "ClientState",
    "CoordinatorDraining",
    "CoordinatorStarted",
    "CoordinatorStopped",
    "CoordinatorWarning",
    "IdentityRevoked",
    "SecurityRefused",
    "StorageFull",
]


@dataclass(frozen=True)
class CoordinatorStarted(EventPayload):
    """A coordinator is serving.

    Attributes:
        address: The address it listens on (the bound port, not 0).
        pid: Its process id.
        state_dir: Its state folder.
        head_version: The head model's version at start.
        is_insecure: Whether it serves without TLS (``--insecure``); key ``insecure``.
    """

    type: ClassVar[str] = "coordinator.started"
    address: str
    pid: int
    state_dir: str
    head_version: int
    is_insecure: bool = field(metadata=renamed("insecure"))


@dataclass(frozen=True)
class CoordinatorStopped(EventPayload):
    """A coordinator stopped.

    Attributes:
        reason: Why (a signal, a drain, an error).
    """

    type: ClassVar[str] = "coordinator.stopped"
    reason: str


@dataclass(frozen=True)
class CoordinatorDraining(EventPayload):
    """A coordinator stops starting rounds and gives the running one time to end.

    Attributes:
        timeout_s: How long the running round is given.
        server_round: The round given that long to end, or None (written as null).
    """

    type: ClassVar[str] = "coordinator.draining"
    timeout_s: float
    server_round: int | None


@dataclass(frozen=True)
class CoordinatorWarning(EventPayload):
    """Something an operator should act on; the keys after ``message`` say what it is about.

    Attributes:
        message: The warning, one line.
        hint: What to do about it; written only when given.
        certificate: The certificate file that expires (an expiring certificate); written only
            when given.
        not_after: When it expires, ISO 8601; written only when given.
        days_left: Days until it expires; written only when given.
        author: Who raised it (the rollback policy's author); written only when given.
    """

    type: ClassVar[str] = "coordinator.warning"
    message: str
    hint: str | None = optional_field()
    certificate: str | None = optional_field()
    not_after: str | None = optional_field()
    days_left: float | None = optional_field()
    author: str | None = optional_field()


@dataclass(frozen=True)
class StorageFull(EventPayload):
    """The coordinator's disk had no room: the write was refused and nothing half-written kept.

    Attributes:
        path: The folder the write went to.
        free_bytes: Free bytes there, or None when it could not be told (written as null).
        needed_bytes: What the write needed, with ``server.min_free_mb``.
        what: The write that did not fit (``upload``, ...).
    """

    type: ClassVar[str] = "storage.full"
    path: str
    free_bytes: int | None
    needed_bytes: int
    what: str


@dataclass(frozen=True)
class SecurityRefused(EventPayload):
    """A call or connection refused: a revoked certificate, a wrong role, a rate or a bound.

    Attributes:
        identity: The caller's identity, or None for a connection refused before any identity.
        reason: Why it was refused.
        rpc: The call refused (``connect`` for a connection).
        serial: The caller's certificate serial (lower-case hex), or None.
        peer: The remote address of a connection refused before any identity (or None); the
            key is written only when ``identity`` is None.
    """

    type: ClassVar[str] = "security.refused"
    identity: str | None
    reason: str
    rpc: str
    serial: str | None = None
    peer: str | None = None

    def to_data(self) -> dict[str, Any]:
        """The event's ``data``; ``peer`` only for a refusal before any identity."""
        data: dict[str, Any] = {"identity": self.identity}
        if self.identity is None:
            data["peer"] = self.peer
        data.update(reason=self.reason, rpc=self.rpc, serial=self.serial)
        return data


@dataclass(frozen=True)
class IdentityRevoked(EventPayload):
    """An identity's certificate (one serial, or every one) is revoked.

    The event's client_id is the identity.

    Attributes:
        serial: The revoked serial (lower-case hex), or None for every certificate.
        reason: The revocation's reason.
        author: Who revoked it.
    """

    type: ClassVar[str] = "identity.revoked"
    serial: str | None
    reason: str
    author: str


@dataclass(frozen=True)
class ClientJoined(EventPayload):
    """A client opened a session.

    Attributes:
        session_id: The new session.
        is_replaced: Whether it replaced a session of the same client; key ``replaced``.
    """

    type: ClassVar[str] = "client.joined"
    session_id: str
    is_replaced: bool = field(metadata=renamed("replaced"))


@dataclass(frozen=True)
class ClientLeft(EventPayload):
    """A client's session ended.

    Attributes:
        reason: Why (its stream closed, silence, eviction, revocation, an expired certificate).
        admin: Who evicted it; written only for an eviction.
        is_expired: Whether its certificate expired; key ``expired``, written only when True.
    """

    type: ClassVar[str] = "client.left"
    reason: str
    admin: str | None = optional_field()
    is_expired: bool = flag_field("expired")


@dataclass(frozen=True)
class ClientEvicted(EventPayload):
    """An admin evicted a client (``client.left`` follows).

    Attributes:
        admin: Who evicted it.
        reason: The reason the admin gave ("" for none).
    """

    type: ClassVar[str] = "client.evicted"
    admin: str
    reason: str


@dataclass(frozen=True)
class ClientState(EventPayload):
    """A client's state changed, or a transfer or training moved on by a tenth.

    Attributes:
        state: ``idle``, ``downloading``, ``training``, ``uploading``, ``failed`` or
            ``offline``.
        progress: Progress in the state, 0..1.
        reason: Why it failed (state ``failed``); written only when given.
        bytes_done: Bytes moved so far, while transferring; written only when given.
        bytes_total: Bytes to move, while transferring; written only when given.
        bytes_per_s: The transfer's rate, while transferring; written only when given.
    """

    type: ClassVar[str] = "client.state"
    state: str
    progress: float
    reason: str | None = optional_field()
    bytes_done: int | None = optional_field()
    bytes_total: int | None = optional_field()
    bytes_per_s: float | None = optional_field()
