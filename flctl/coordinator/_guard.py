"""Revocations and certificates' validity, as the running coordinator enforces them.

The revocations are read from the store once, at start, into memory (identity -> every
certificate, or a set of serials); ``Admin.Revoke`` adds to them while the coordinator runs. Every
call is checked against them before it touches any state: a revoked caller gets
PERMISSION_DENIED, and each refusal appends a ``security.refused`` event with the identity, the
reason and the RPC. The caller's certificate must also be valid at the time of the call, not only
at the handshake that opened the connection: one that expired meanwhile gets UNAUTHENTICATED
(:class:`CertificateError`, "certificate of ID expired at ..."), recorded the same way.

Each identity also has a token bucket (``server.rate_limit_per_s`` calls per second, bursts of
``server.rate_limit_burst``): a call beyond it is RESOURCE_EXHAUSTED before it touches any
state, recorded as ``security.refused`` (at most one event per identity per second, so a flood
does not flood the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flctl.core import events as ev
from flctl.core.errors import CertificateError, PermissionDeniedError, ResourceExhaustedError
from flctl.store import RevocationRecord, SqlStore, list_revocations
from flctl.transport.grpc import RpcContext

from ._events import EventLog

__all__ = ["RevocationGuard"]

log = logging.getLogger("flctl.coordinator")


class RevocationGuard:
    """The revocations in force, and the check every RPC makes against them.

    Args:
        events: Where refusals are recorded.
        records: The revocations already in the store.
    """

    def __init__(
        self,
        events: EventLog,
        records: Iterable[RevocationRecord] = (),
        *,
        rate_per_s: float = 0.0,
        burst: int = 1,
    ) -> None:
        self._events = events
        self._everything: set[str] = set()
        self._serials: dict[str, set[int]] = {}
        for record in records:
            self.add(record.identity, record.serial)
        self._rate = rate_per_s
        self._burst = float(max(1, burst))
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, at)
        self._last_logged: dict[str, float] = {}

    @classmethod
    def load(
        cls, store: SqlStore, events: EventLog, *, rate_per_s: float = 0.0, burst: int = 1
    ) -> RevocationGuard:
        """Read every revocation from the store."""
        return cls(events, list_revocations(store), rate_per_s=rate_per_s, burst=burst)

    def admit(self, ctx: RpcContext, rpc: str) -> None:
        """The check at the start of every call: the rate limit, then the revocations.

        Raises:
            ResourceExhaustedError: The identity made more calls than its bucket allows.
            PermissionDeniedError: The identity or certificate is revoked.
        """
        if self._rate > 0:
            now = time.monotonic()
            tokens, at = self._buckets.get(ctx.identity, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens < 1.0:
                self._buckets[ctx.identity] = (tokens, now)
                self._refuse_rate(ctx, rpc, now)
            self._buckets[ctx.identity] = (tokens - 1.0, now)
        self.check(ctx, rpc)

    def _refuse_rate(self, ctx: RpcContext, rpc: str, now: float) -> None:
        why = f"rate limit: more than {self._rate:g} calls/s (burst {self._burst:g})"
        if now - self._last_logged.get(ctx.identity, -1e9) >= 1.0:
            self._last_logged[ctx.identity] = now
            log.info(
                "refused %s (%s) on %s: %s",
                ctx.identity,
                ctx.peer,
                rpc,
                why,
                extra={"client": ctx.identity},
            )
            self._events.emit(
                ev.SecurityRefused(identity=ctx.identity, reason=why, rpc=rpc),
                client_id=ctx.identity,
            )
        raise ResourceExhaustedError(
            f"{ctx.identity}: {why}",
            hint="slow down: retry after a short wait (server.rate_limit_per_s)",
        )

    def add(self, identity: str, serial: int | None) -> None:
        """Revoke ``identity`` as a whole (``serial`` None), or one certificate of it."""
        if serial is None:
            self._everything.add(identity)
        else:
            self._serials.setdefault(identity, set()).add(serial)

    def reason(self, identity: str, serial: int = 0) -> str | None:
        """Why a caller with this identity and certificate serial is refused, or None.

        A serial of 0 (an ``--insecure`` caller, which has no certificate) matches only
        revocations of the whole identity.
        """
        if identity in self._everything:
            return "identity revoked"
        if serial and serial in self._serials.get(identity, ()):
            return f"certificate serial {serial:x} revoked"
        return None

    def check(self, ctx: RpcContext, rpc: str) -> None:
        """Refuse a caller whose certificate is out of its validity window or revoked.

        Each refusal records a ``security.refused`` event, then raises.

        Raises:
            CertificateError: ``certificate of ID expired at ...`` (or is not valid yet).
            PermissionDeniedError: ``certificate of ID is revoked``.
        """
        invalid = ctx.validity_problem(time.time())
        if invalid is not None:
            self._record(ctx, rpc, f"certificate {invalid}")
            raise CertificateError(
                f"certificate of {ctx.identity} {invalid}",
                hint="the coordinator accepts no call made with it: ask the operator for a new "
                "certificate (flctl certs issue), then join again",
            )
        why = self.reason(ctx.identity, ctx.serial)
        if why is None:
            return
        self._record(ctx, rpc, why)
        raise PermissionDeniedError(
            f"certificate of {ctx.identity} is revoked",
            hint="the operator revoked it: ask them for a new certificate",
        )

    def _record(self, ctx: RpcContext, rpc: str, why: str) -> None:
        """Log a refusal and append its ``security.refused`` event."""
        log.info(
            "refused %s (%s) on %s: %s",
            ctx.identity,
            ctx.peer,
            rpc,
            why,
            extra={"client": ctx.identity},
        )
        self._events.emit(
            ev.SecurityRefused(
                identity=ctx.identity,
                reason=why,
                rpc=rpc,
                serial=format(ctx.serial, "x") if ctx.serial else None,
            ),
            client_id=ctx.identity,
        )
