"""The join loop: connect, join, serve tasks, reconnect with backoff, leave on refusal.

```
connect+Join --ok--> Tasks stream --task--> download (cache) -> fit -> upload --+
     ^   |                 |                                                   |
     |   +-- unavailable --+-- stream ends / heartbeat says rejoin -> backoff -+
     |   +-- refused (TLS, certificate, role, model mismatch) ---> exit non-zero
```

A fit task of a round with secure aggregation (its config holds ``flctl.secagg``) runs the
SecAgg stages around it (``_secagg.py``): keys are exchanged before the model is fetched, the
update is uploaded as a masked input, and the unmasking request is answered after the upload.

The session token is renewed (``RenewToken``) halfway through its lifetime, from the heartbeat
loop: the session, its task stream and any transfer carry on. Our own certificate is checked
before each connection: an expired one ends the client with "expired" (exit 21) instead of a
handshake the coordinator would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from flctl.core._process import process_alive
from flctl.core.config import PrivacyConfig
from flctl.core.dp import TaskPrivacy, split_task
from flctl.core.errors import (
    AuthenticationError,
    CertificateError,
    ConflictError,
    ConnectError,
    DeadlineExceededError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolMismatchError,
    SecAggError,
    SessionConflictError,
    StandbyError,
    StorageFullError,
    TaskError,
    TransportError,
)
from flctl.core.work import SecAggAnswer, Task
from flctl.security import SECAGG_TASK_KEY, SecAggTask, identity_from_pem
from flctl.store import BlobStore, WriteBehind
from flctl.tensors import (
    MASKED_ENCODING,
    UpdateEncoding,
    fingerprint,
    read_metadata,
    sha256_file,
    spec_of,
)
from flctl.transport import (
    CODEC_NONE,
    CODECS,
    LEVELS,
    SAMPLE_BYTES,
    Backoff,
    Decision,
    choose_codec,
    compress_chunks,
)
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    CoordinatorClient,
    closed_during_handshake,
    from_value_map,
    insecure_channel,
    is_loopback_host,
    pb,
    probe_certificate,
    secure_channel,
    split_address,
    split_servers,
    to_value_map,
)

from ._api import Client
from ._secagg import SecAggParticipant, exchange_keys, finish_unmasking
from ._work import evaluate_client, fit_client

__all__ = ["ClientCache", "JoinOptions", "PendingUpload", "PendingUploads", "Runner", "fetch_blob"]

#: BeginUpload + Upload attempts within one session (a lost race, a dropped upload).
_UPLOAD_ATTEMPTS = 5
#: How many ended tasks a runner remembers (a task is sent again within its round only).
_FINAL_TASKS_KEPT = 256
#: How many rounds' SecAgg parts a runner keeps (a task is sent again within its round only).
_SECAGG_KEPT = 4
#: Seconds a SecAgg stage call may wait beyond the round's deadline and the stage timeouts.
_SECAGG_SLACK_S = 30.0
#: The shortest time between two heartbeats sent early for a training's progress.
_PROGRESS_HEARTBEAT_GAP_S = 1.0

log = logging.getLogger("flctl.client")

_T = TypeVar("_T")

#: Seconds before trying the next coordinator of ``--server A,B`` after one refused us.
_NEXT_SERVER_DELAY_S = 0.2


@dataclass(frozen=True)
class JoinOptions:
    """How a client reaches its coordinator.

    Attributes:
        server: ``HOST:PORT``, or several coordinators' addresses ``A,B,...`` sharing one
            store: the client goes to the one that leads, and follows a take-over.
        client_id: The identity in our certificate (sent as metadata only with ``insecure``).
        cert_pem, key_pem, ca_pem: Our certificate, its key, the CA we trust.
        insecure: Plaintext (loopback only).
        cache_dir: Content-addressed model cache (and partial downloads).
        cache_models: How many models the cache keeps (``client.cache_models``).
        once: Leave after one round.
        max_tls_failures: Consecutive refused handshakes before giving up.
        connect_timeout_s: How long one connection attempt may take.
        give_up_after_s: Leave with :class:`ConnectError` when no coordinator could be reached
            for this long (None: keep trying; a coordinator may start later).
        replace: Take over a live session of this identity held by another process.
        update_encoding: ``"full"`` (the trained model) or ``"delta"`` (trained minus the
            round's model), ``client.update_encoding``.
        update_dtype: ``"float32"`` (the model's own dtype), ``"float16"`` or ``"bfloat16"``,
            ``client.update_dtype``.
        privacy: This client's own ``[privacy]`` table. With ``mode`` other than ``"off"`` the
            client refuses tasks of a coordinator whose privacy mode differs (and local-DP
            tasks that noise less than its ``noise_multiplier``); with ``"off"`` it applies
            whatever the task asks (local DP: clip and noise before upload, always).
    """

    server: str
    client_id: str
    cert_pem: bytes = b""
    key_pem: bytes = b""
    ca_pem: bytes = b""
    insecure: bool = False
    cache_dir: Path = Path(".flctl-client")
    once: bool = False
    max_tls_failures: int = 3
    connect_timeout_s: float = 10.0
    give_up_after_s: float | None = None
    replace: bool = False
    backoff_cap_s: float = 10.0
    cache_models: int = 2
    update_encoding: str = "full"
    update_dtype: str = "float32"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def wire_update_dtype(self) -> str:
        """``UploadHeader.dtype``: empty for the model's own dtype (``"float32"``)."""
        return "" if self.update_dtype == "float32" else self.update_dtype


class ClientCache:
    """Blobs this client already holds, by digest; partial downloads resume from their size.

    The cache is bounded: it keeps the ``keep`` most recently used models (``client.cache_models``).
    Before a new blob is fetched, :meth:`make_room` removes the least recently used ones beyond
    ``keep - 1`` and partial downloads of other digests (a model the coordinator has moved past),
    so a client running many rounds of a large model holds at most ``keep`` of them on disk.
    """

    def __init__(self, root: Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("a client cache keeps at least one model")
        self.root = root
        self.keep = keep
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "partial").mkdir(parents=True, exist_ok=True)

    def used(self, digest: str) -> None:
        """Mark ``digest`` as just used (the eviction order is least recently used first)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(digest))

    def make_room(self, digest: str) -> list[str]:
        """Evict what fetching ``digest`` makes surplus; return the evicted digests.

        Keeps the ``keep - 1`` most recently used complete blobs (the new one makes ``keep``) and
        the partial download of ``digest`` itself; removes partial downloads of other digests and
        training outputs left by a client process that no longer runs.
        """
        blobs: list[tuple[float, Path]] = []
        for path in (self.root / "blobs").iterdir():
            with contextlib.suppress(OSError):
                blobs.append((path.stat().st_mtime, path))
        blobs.sort(reverse=True)
        evicted = []
        for _, path in blobs[max(self.keep - 1, 0) :]:
            if path.name != digest:
                path.unlink(missing_ok=True)
                evicted.append(path.name)
        keep_partial = self.partial(digest).name
        for path in (self.root / "partial").iterdir():
            if path.name.endswith(".part") and path.name != keep_partial:
                path.unlink(missing_ok=True)
            elif path.name.startswith("update-") and not _pid_alive(path.name):
                path.unlink(missing_ok=True)
        return evicted

    def path(self, digest: str) -> Path:
        """Where a complete blob lives."""
        return self.root / "blobs" / BlobStore.check_digest(digest)

    def partial(self, digest: str) -> Path:
        """Where an interrupted download of ``digest`` is kept."""
        return self.root / "partial" / f"{self.path(digest).name}.part"

    def has(self, digest: str) -> bool:
        """Whether ``digest`` is complete in the cache."""
        return self.path(digest).is_file()


def _pid_alive(name: str) -> bool:
    """Whether the process that named a training output ``update-<pid>-<ns>`` still runs."""
    try:
        pid = int(name.split("-")[1])
    except (IndexError, ValueError):
        return False
    return pid == os.getpid() or process_alive(pid)


@dataclass(frozen=True)
class PendingUpload:
    """An update written and not yet answered by the coordinator: its header and its bytes."""

    header: pb.UploadHeader
    path: Path


class PendingUploads:
    """Updates waiting for the coordinator's answer, kept across restarts of the client.

    ``<cache>/uploads/<task_id>.safetensors`` holds the update and ``<task_id>.header`` its
    serialized header (written after the update, temp -> rename: a header means a whole
    update). When the task arrives again (the connection dropped, the client was killed, the
    coordinator restarted), the upload resumes instead of the client training again.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _paths(self, task_id: str) -> tuple[Path, Path]:
        if not task_id or not all(c.isalnum() or c in "-_" for c in task_id):
            raise IntegrityError(f"task id {task_id[:40]!r} is not a plain name")
        return self.root / f"{task_id}.safetensors", self.root / f"{task_id}.header"

    def save(self, task_id: str, header: pb.UploadHeader, update: Path) -> PendingUpload:
        """Keep ``update`` (moved, not copied) and its header for ``task_id``."""
        data_path, header_path = self._paths(task_id)
        os.replace(update, data_path)
        temp = header_path.with_suffix(".tmp")
        temp.write_bytes(header.SerializeToString())
        os.replace(temp, header_path)
        return PendingUpload(header, data_path)

    def load(self, task_id: str) -> PendingUpload | None:
        """The pending update of ``task_id``, if one is whole on disk."""
        data_path, header_path = self._paths(task_id)
        try:
            header = pb.UploadHeader.FromString(header_path.read_bytes())
            size = data_path.stat().st_size
        except (OSError, ValueError):
            return None
        if header.task_id != task_id or size != header.size:
            self.discard(task_id)
            return None
        return PendingUpload(header, data_path)

    def discard(self, task_id: str) -> None:
        """Forget a task's update (answered, or no longer wanted)."""
        for path in self._paths(task_id):
            path.unlink(missing_ok=True)

    def discard_before(self, server_round: int) -> None:
        """Forget updates of rounds before ``server_round`` (they can no longer be accepted)."""
        for header_path in self.root.glob("*.header"):
            try:
                header = pb.UploadHeader.FromString(header_path.read_bytes())
            except (OSError, ValueError):
                header = pb.UploadHeader()
            if header.server_round < server_round:
                header_path.unlink(missing_ok=True)
                header_path.with_suffix(".safetensors").unlink(missing_ok=True)


class _HashingSink:
    """A file that hashes what is written to it (the digest is checked without a re-read).

    What is written starts going to disk at once (:class:`WriteBehind`), so the fsync that
    makes the download durable has little left to do.
    """

    def __init__(self, handle: BinaryIO, digest: Any) -> None:
        self._handle = handle
        self._digest = digest
        self._writeback = WriteBehind(handle)

    def write(self, data: bytes | memoryview) -> int:
        self._digest.update(data)
        written = self._handle.write(data)
        self._writeback.wrote(len(data))
        return written


async def fetch_blob(
    api: CoordinatorClient,
    cache: ClientCache,
    digest: str,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> Path:
    """Return the cached path of blob ``digest``, downloading what is missing.

    A blob already in the cache is never fetched again. A partial download (a killed client,
    a dropped connection) resumes from the bytes on disk. The bytes are hashed as they arrive
    and the blob enters the cache only if they match ``digest``. ``timings`` (if given)
    receives ``transfer_s`` (first byte to last, hashed) and ``fsync_s`` (durability).

    Raises:
        IntegrityError: The bytes do not hash to ``digest`` (the partial file is discarded).
    """
    target = cache.path(digest)
    if target.is_file():
        cache.used(digest)
        return target
    cache.make_room(digest)
    partial = cache.partial(digest)
    hasher = hashlib.sha256()
    offset = 0
    if partial.exists():
        with partial.open("rb") as fh:
            while block := fh.read(1 << 20):
                hasher.update(block)
                offset += len(block)
    started = time.perf_counter()
    with partial.open("ab") as handle:
        await api.download(
            digest, _HashingSink(handle, hasher), offset=offset, on_chunk=on_progress
        )
        handle.flush()
        transferred = time.perf_counter()
        os.fsync(handle.fileno())
    if timings is not None:
        timings["transfer_s"] = transferred - started
        timings["fsync_s"] = time.perf_counter() - transferred
    if hasher.hexdigest() != digest:
        partial.unlink(missing_ok=True)
        raise IntegrityError(f"downloaded blob {digest[:12]} does not match its digest")
    os.replace(partial, target)
    return target


@dataclass
class _Status:
    state: str = "idle"
    server_round: int = 0
    progress: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_s: float = 0.0
    failure: str = ""
    dirty: asyncio.Event = field(default_factory=asyncio.Event)


class Runner:
    """Runs one client against one coordinator until stopped, refused, or (``once``) done.

    Args:
        client: The task's client.
        options: Where and how to connect.
        on_event: Called with (kind, details) for human output: "joined", "round",
            "uploaded", "rejected", "reconnecting", "left".
    """

    def __init__(
        self,
        client: Client,
        options: JoinOptions,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._options = options
        #: Which of the coordinators (``--server A,B``) is tried now.
        self._server_index = 0
        self._on_event = on_event or (lambda kind, details: None)
        self._cache = ClientCache(options.cache_dir, keep=options.cache_models)
        self._pending = PendingUploads(options.cache_dir / "uploads")
        #: Tasks ended for good (update refused, limits exceeded), and why: a task sent again
        #: is answered with its failure, not trained and uploaded again to the same end.
        self._final: dict[str, str] = {}
        #: this client's part in each recent round with secure aggregation, by task id: kept
        #: across reconnections, so a task sent again carries on where it was
        self._participants: dict[str, SecAggParticipant] = {}
        self._backoff = Backoff(cap=options.backoff_cap_s, rng=rng or random.Random())
        #: For downloads that fail their digest check: not reset by a join (the coordinator
        #: answers, it is what it serves that is wrong), only by a download that checks out.
        self._integrity_backoff = Backoff(
            initial=1.0, cap=max(1.0, options.backoff_cap_s), rng=rng or random.Random()
        )
        self._storage_backoff = Backoff(
            initial=1.0, cap=max(1.0, options.backoff_cap_s), rng=rng or random.Random()
        )
        self._status = _Status()
        #: Random per process: the coordinator tells our own rejoin from another process's.
        self._instance_id = os.urandom(16).hex()
        self.rounds_done = 0
        self._joined_at = 0.0
        #: The last JoinReply: the negotiated codecs, compression mode and level, the limits.
        self.join_reply: pb.JoinReply | None = None
        #: When (time.monotonic) the session token is due for renewal: half its lifetime.
        self._renew_at = float("inf")
        #: Tokens renewed in this process (for logs and tests).
        self.tokens_renewed = 0
        spec = spec_of(client.get_parameters())
        self._fingerprint = fingerprint(spec)
        self._spec_json = json.dumps({k: [d, list(s)] for k, (d, s) in spec.items()})

    def _emit(self, kind: str, **details: Any) -> None:
        self._on_event(kind, details)

    @property
    def _servers(self) -> tuple[str, ...]:
        """The coordinators to try, in turn (read from the options at each use)."""
        return split_servers(self._options.server)

    @property
    def server(self) -> str:
        """The coordinator address this client talks to now."""
        servers = self._servers
        return servers[self._server_index % len(servers)]

    def _next_server(self) -> bool:
        """Go on to the next coordinator of ``--server A,B``; False after the last one."""
        self._server_index = (self._server_index + 1) % len(self._servers)
        return self._server_index != 0

    def _channel(self) -> Any:
        o = self._options
        if o.insecure:
            return insecure_channel(self.server)
        return secure_channel(self.server, cert_pem=o.cert_pem, key_pem=o.key_pem, ca_pem=o.ca_pem)

    async def run(self, stop: asyncio.Event) -> int:
        """Serve rounds until ``stop`` is set; return the number of rounds served.

        Raises:
            SecurityError: The coordinator refused our certificate, role or token.
            ProtocolMismatchError: Our model or protocol differ from the coordinator's.
        """
        split_servers(self._options.server)  # a malformed --server: refused here, not retried
        tls_failures = 0
        unreachable_since: float | None = None
        conflict_waited = False
        while not stop.is_set():
            delay: float | None = None
            self._check_own_certificate()
            try:
                await self._session(stop)
                if self._options.once and self.rounds_done >= 1:
                    break
                reason = "the coordinator ended the session"
                conflict_waited = False
            except SessionConflictError as exc:
                # Another process holds this identity's live session. If that process is gone,
                # its session ends when its heartbeats are overdue: wait that long once, then
                # leave (the other one keeps its session).
                if conflict_waited or self._options.replace:
                    raise
                conflict_waited = True
                retry_after = exc.details.get("retry_after_s")
                wait = float(retry_after) if isinstance(retry_after, int | float) else 0.0
                delay = min(3600.0, max(0.0, wait)) + 0.5
                reason = (
                    f"{exc.message}; trying once more when it would have ended if that process "
                    "is gone (--replace takes over now)"
                )
            except CertificateError as exc:
                self._check_own_certificate()
                if "expired" in exc.message:  # the coordinator's clock says so: no retry helps
                    raise
                tls_failures += 1
                if tls_failures >= self._options.max_tls_failures:
                    raise CertificateError(
                        f"the coordinator at {self.server} refused the TLS handshake "
                        f"{tls_failures} times: {exc.message}",
                        hint=exc.hint,
                    ) from None
                reason = f"TLS handshake failed: {exc.message}"
            except (PermissionDeniedError, ProtocolMismatchError):
                raise
            except AuthenticationError as exc:
                if "token" not in exc.message and "session" not in exc.message:
                    raise
                reason = f"session ended ({exc.message}); joining again"
            except (ConnectError, DeadlineExceededError, TransportError) as exc:
                tls_failures = 0
                reason = f"{exc.message}; {exc.hint}" if exc.hint else exc.message
                if len(self._servers) > 1:
                    # a standby (it names the leader), or a coordinator gone: the next address
                    # may lead. Once round the list without a pause, then back off as with one
                    # coordinator.
                    leader = exc.details.get("leader") if isinstance(exc, StandbyError) else None
                    if leader in self._servers and leader != self.server:
                        self._server_index = self._servers.index(str(leader))
                        delay = _NEXT_SERVER_DELAY_S
                    elif self._next_server():
                        delay = _NEXT_SERVER_DELAY_S
                    reason = f"{exc.message}; trying {self.server}"
                now = time.monotonic()
                if unreachable_since is None or self._joined_at > unreachable_since:
                    unreachable_since = now  # the first failure since we last joined
                limit = self._options.give_up_after_s
                if limit is not None and now - unreachable_since >= limit:
                    raise ConnectError(
                        f"gave up after {limit:g} s without a coordinator: {exc.message}",
                        hint=exc.hint,
                    ) from None
            except IntegrityError as exc:  # a corrupt download: back off, then start over
                reason = exc.message
                delay = self._integrity_backoff.next_delay()
            except StorageFullError as exc:
                # the coordinator's disk is full: the update stays on our disk and is sent
                # again later, after a backoff that joining again does not reset
                reason = f"{exc.message}; the update is kept and sent again"
                delay = self._storage_backoff.next_delay()
            except FlctlError as exc:
                reason = exc.message
            if stop.is_set():
                break
            if delay is None:
                delay = self._backoff.next_delay()
            self._emit("reconnecting", reason=reason, delay_s=round(delay, 2))
            await _wait(stop, delay)
        self._emit("left", rounds=self.rounds_done)
        return self.rounds_done

    async def _check_refusal(self, exc: FlctlError) -> None:
        """Raise CertificateError if the coordinator refuses our certificate (see _session).

        Returns when it accepts it or cannot be reached: the caller raises a connection error,
        which the client retries.
        """
        o = self._options
        verdict = await asyncio.to_thread(
            probe_certificate,
            self.server,
            cert_pem=o.cert_pem,
            key_pem=o.key_pem,
            ca_pem=o.ca_pem,
            timeout=o.connect_timeout_s,
        )
        if verdict != "refused":
            # accepted: the connection dropped for another reason; unknown: the coordinator is
            # not reachable now. Either way a retry, not a refusal.
            log.info("the TLS handshake was cut (%s); our certificate: %s", exc.message, verdict)
            return
        self._check_own_certificate()  # it may have expired since we last looked
        raise CertificateError(
            "the coordinator closed the connection right after the TLS handshake: it does not "
            f"accept this certificate ({exc.message})",
            hint="check that the certificate was issued by the coordinator's CA, "
            "is still valid and is not revoked",
        )

    def _check_own_certificate(self) -> None:
        """Raise CertificateError if our certificate is expired or not valid yet (local clock).

        The coordinator's handshake refuses such a certificate with a closed socket, which says
        nothing of why; the certificate itself does.
        """
        o = self._options
        if o.insecure or not o.cert_pem:
            return
        try:
            identity = identity_from_pem(o.cert_pem)
        except CertificateError:
            return  # unreadable: the handshake says what is wrong with it
        now = datetime.now(UTC)
        where = f"the certificate of {identity.name} (serial {identity.serial:x})"
        if now >= identity.not_after:
            raise CertificateError(
                f"{where} expired on {identity.not_after:%Y-%m-%d %H:%M:%S} UTC; the "
                "coordinator refuses it",
                hint="ask the operator for a new certificate (flctl certs issue, or certs "
                "request and certs sign), then join again",
            )
        if now < identity.not_before:
            raise CertificateError(
                f"{where} is not valid until {identity.not_before:%Y-%m-%d %H:%M:%S} UTC",
                hint="check this machine's clock, or wait until then",
            )

    def _token_issued(self, ttl_s: float, expires_unix: float) -> None:
        """Schedule the renewal of a token just received: halfway through its lifetime."""
        lifetime = ttl_s if ttl_s > 0 else expires_unix - time.time()
        self._renew_at = time.monotonic() + max(0.0, lifetime) / 2

    async def _renew_token(self, api: CoordinatorClient, interval: float) -> None:
        """Renew the session token if it is due; a refusal ends the session (join again)."""
        if time.monotonic() < self._renew_at:
            return
        try:
            reply = await api.renew_token()
        except (AuthenticationError, PermissionDeniedError, CertificateError):
            raise  # the session or our certificate is over: the run loop decides
        except FlctlError as exc:
            # unreachable for now: try again soon, while the token still holds
            log.info("renewing the session token failed: %s", exc.message)
            self._renew_at = time.monotonic() + min(interval, 1.0)
            return
        self.tokens_renewed += 1
        self._token_issued(reply.token_ttl_s, reply.token_expires_unix)
        log.debug("session token renewed; it expires at %.0f", reply.token_expires_unix)

    async def _session(self, stop: asyncio.Event) -> None:
        channel = self._channel()
        api = CoordinatorClient(channel, identity=self._options.client_id)
        heartbeats: asyncio.Task[None] | None = None
        stream_task: asyncio.Task[None] | None = None
        try:
            request = pb.JoinRequest(
                protocol_version=PROTOCOL_VERSION,
                task_fingerprint=self._fingerprint,
                client_version="flctl",
                codecs=list(CODECS),  # every codec this build reads and writes
                instance_id=self._instance_id,
                replace=self._options.replace,
            )
            to_value_map(request.properties, {"model_spec": self._spec_json})
            try:
                reply = await api.join(request, timeout=self._options.connect_timeout_s)
            except (ConnectError, CertificateError) as exc:
                # With TLS 1.3 the server checks our certificate after the client's side of
                # the handshake is done; a refusal then reaches us only as a closed socket,
                # in the same words as a connection that dropped (mid-handshake, gRPC even
                # calls it a handshake failure). One handshake of our own tells them apart.
                if not closed_during_handshake(exc.message) or self._options.insecure:
                    raise
                await self._check_refusal(exc)
                raise ConnectError(
                    f"the connection closed during the TLS handshake: {exc.message}"
                ) from None
            self._backoff.reset()
            self._joined_at = time.monotonic()
            self._token_issued(reply.token_ttl_s, reply.token_expires_unix)
            self.join_reply = reply
            self._emit("joined", client_id=reply.client_id, server=self.server)
            heartbeats = asyncio.create_task(
                self._heartbeats(api, max(0.1, reply.heartbeat_interval_s))
            )
            stream_task = asyncio.create_task(self._serve_tasks(api, reply))
            stopper = asyncio.create_task(stop.wait())
            assert heartbeats is not None
            done, _ = await asyncio.wait(
                {stream_task, stopper, heartbeats}, return_when=asyncio.FIRST_COMPLETED
            )
            stopper.cancel()
            for finished in (stream_task, heartbeats):
                if finished in done:
                    finished.result()  # re-raise what ended the stream, or a refused heartbeat
        finally:
            for task in (stream_task, heartbeats):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FlctlError):
                        await task
            await api.close()

    async def _serve_tasks(self, api: CoordinatorClient, reply: pb.JoinReply) -> None:
        async for task in api.tasks():
            if task.kind == "evaluate":  # a kind this flctl does not know never gets here
                await self._evaluate(api, reply, task)
                continue
            await self._fit(api, reply, task)
            if self._options.once and self.rounds_done >= 1:
                return

    async def _heartbeats(self, api: CoordinatorClient, interval: float) -> None:
        while True:
            status = self._status
            status.dirty.clear()
            await self._renew_token(api, interval)
            try:
                reply = await api.heartbeat(
                    pb.HeartbeatRequest(
                        state=status.state,
                        server_round=status.server_round,
                        progress=status.progress,
                        bytes_done=status.bytes_done,
                        bytes_total=status.bytes_total,
                        bytes_per_s=status.bytes_per_s,
                        failure=status.failure,
                    )
                )
            except (PermissionDeniedError, CertificateError):
                raise  # revoked, or our certificate expired: leave now, even while training
            except FlctlError as exc:  # a missed heartbeat is not fatal: the stream decides
                log.debug("heartbeat failed: %s", exc.message)
            else:
                if reply.command == "rejoin":
                    # our session is over (evicted, dropped, the coordinator restarted): any
                    # call with its token would be refused, so join again now
                    raise AuthenticationError(
                        "the coordinator ended our session (heartbeat answered rejoin)"
                    )
            due = self._renew_at - time.monotonic()
            await _wait(status.dirty, max(0.0, min(interval, due)))

    def _set_state(
        self, state: str, server_round: int, progress: float = 0.0, failure: str = ""
    ) -> None:
        self._status.failure = failure
        self._status.state = state
        self._status.server_round = server_round
        self._status.progress = progress
        self._status.bytes_done = self._status.bytes_total = 0
        self._status.bytes_per_s = 0.0
        self._status.dirty.set()

    def _training_progress(self, server_round: int) -> Callable[[float], None]:
        """A sink for the task's ``context.report_progress``; it runs in the fit's thread.

        A step of 10 % heartbeats at once, but not within ``_PROGRESS_HEARTBEAT_GAP_S`` of
        the last one: a fit of a fraction of a second would otherwise send ten heartbeats a
        round and run into the coordinator's rate limit. The next regular heartbeat carries
        the steps in between.
        """
        loop = asyncio.get_running_loop()
        status = self._status
        last = [time.monotonic()]  # the "training" state itself was just sent

        def apply(fraction: float) -> None:
            if status.state != "training" or status.server_round != server_round:
                return  # a report that arrived after the fit returned
            now = time.monotonic()
            stepped = int(fraction * 10) != int(status.progress * 10)
            if stepped and now - last[0] >= _PROGRESS_HEARTBEAT_GAP_S:
                last[0] = now
                status.dirty.set()  # heartbeat now: the coordinator shows steps
            status.progress = fraction

        def report(fraction: float) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the client left
                loop.call_soon_threadsafe(apply, fraction)

        return report

    # ------------------------------------------------------------------ one task

    def _progress(self, direction: str, server_round: int) -> Callable[[int, int], None]:
        """A callback that reports a transfer's bytes (for progress bars and heartbeats)."""
        first: list[float] = []  # (time, bytes) of the first report: the rate is since then

        def report(done: int, total: int) -> None:
            progress = done / total if total else 0.0
            status = self._status
            now = time.monotonic()
            if not first:
                first.extend((now, float(done)))
            elif now > first[0]:
                status.bytes_per_s = (done - first[1]) / (now - first[0])
            if int(progress * 10) != int(status.progress * 10):
                status.dirty.set()  # heartbeat now: the coordinator's panel shows steps
            status.progress = progress
            status.bytes_done, status.bytes_total = done, total
            self._emit(
                "transfer", direction=direction, server_round=server_round, done=done, total=total
            )

        return report

    async def _download(self, api: CoordinatorClient, digest: str, server_round: int) -> Path:
        if self._cache.has(digest):
            self._emit("cached", server_round=server_round, digest=digest)
        else:
            with contextlib.suppress(OSError):
                held = self._cache.partial(digest).stat().st_size
                if held:
                    self._emit(
                        "download_resumed", server_round=server_round, digest=digest, offset=held
                    )
        path = await fetch_blob(
            api, self._cache, digest, on_progress=self._progress("down", server_round)
        )
        self._integrity_backoff.reset()
        return path

    async def _fit(self, api: CoordinatorClient, reply: pb.JoinReply, task: Task) -> None:
        server_round = int(task.server_round)
        privacy, config = split_task(dict(task.config))
        secagg = config.pop(SECAGG_TASK_KEY, None)
        refusal = privacy.refusal(self._options.privacy)
        if refusal is not None:
            # a privacy mismatch repeats every round: leave rather than upload against it
            raise ProtocolMismatchError(
                f"round {server_round}: {refusal}",
                hint="make privacy.mode agree with the coordinator's (docs/privacy.md)",
            )
        self._emit("round", server_round=server_round, task_id=task.task_id)
        started = time.monotonic()
        self._pending.discard_before(server_round)
        final = self._final.get(task.task_id)
        if final is not None:
            self._pending.discard(task.task_id)
            self._set_state("failed", server_round, failure=final)
            return
        if secagg is not None:
            await self._fit_secure(api, reply, task, str(secagg), privacy.is_local, config)
            return
        pending = self._pending.load(task.task_id)
        if pending is None:
            self._set_state("downloading", server_round)
            model_path = await self._download(api, task.model_digest, server_round)
            self._set_state("training", server_round)
            try:
                update_path, num_examples, metrics = await _in_daemon_thread(
                    self._train, model_path, config, privacy, self._training_progress(server_round)
                )
            except TaskError as exc:
                # the client loop is one of the three places that catch broadly: report, go on
                trace = exc.details.get("traceback")
                log.error(
                    "round %d: %s%s", server_round, exc.message, f"\n{trace}" if trace else ""
                )
                self._emit("failed", server_round=server_round, reason=exc.message)
                # the coordinator hears why with the failed state (round status, events)
                self._set_state("failed", server_round, failure=exc.message)
                return
            try:
                size = update_path.stat().st_size
                over = _over_limits(reply.limits, metrics, size)
                if over is not None:
                    # the coordinator would refuse it: say why here, without uploading
                    log.error("round %d: %s", server_round, over)
                    self._emit("failed", server_round=server_round, reason=over)
                    self._end_task(task.task_id, server_round, over)
                    return
                # the header says what the file holds (local DP writes a delta whatever
                # client.update_encoding says)
                written = UpdateEncoding.from_metadata(read_metadata(update_path))
                header = pb.UploadHeader(
                    server_round=server_round,
                    task_id=task.task_id,
                    num_examples=num_examples,
                    digest=await asyncio.to_thread(sha256_file, update_path),
                    size=size,
                    codec="none",
                    encoding=written.encoding,
                    dtype=written.wire_dtype,
                    base_digest=task.model_digest if written.encoding == "delta" else "",
                )
                to_value_map(header.metrics, metrics)
                # kept until the coordinator answers: a killed client resumes the upload
                pending = self._pending.save(task.task_id, header, update_path)
            finally:
                update_path.unlink(missing_ok=True)
        else:
            self._emit("pending", server_round=server_round, task_id=task.task_id)
        self._set_state("uploading", server_round)
        chunk = int(reply.limits.max_chunk_bytes) or (1 << 20)
        try:
            answer = await self._send(api, reply, pending, chunk)
        except InvalidInputError as exc:
            # the coordinator judged the update itself (header, tensors, values, metrics):
            # sent again it would be refused again, so the task ends here, not the session
            self._pending.discard(task.task_id)
            reason = f"the coordinator refused the update: {exc.message}"
            log.error("round %d: %s", server_round, reason)
            self._emit("rejected", server_round=server_round, reason=exc.message)
            self._end_task(task.task_id, server_round, reason)
            return
        self._pending.discard(task.task_id)
        self._set_state("idle", 0)
        header = pending.header
        if answer.accepted:
            self.rounds_done += 1
            self._emit(
                "uploaded",
                server_round=server_round,
                num_examples=int(header.num_examples),
                metrics=from_value_map(header.metrics),
                size=int(header.size),
                seconds=round(time.monotonic() - started, 3),
            )
        else:
            refused = f"the coordinator refused the update: {answer.reason}"
            self._remember_final(task.task_id, refused)
            self._emit("rejected", server_round=server_round, reason=answer.reason)

    async def _fit_secure(
        self,
        api: CoordinatorClient,
        reply: pb.JoinReply,
        task: Task,
        entry: str,
        is_local_dp: bool,
        config: dict[str, Any],
    ) -> None:
        """A fit task of a round with secure aggregation (see ``_secagg.py``).

        Keys first (two stage calls), then the model, the fit and the masked input (uploaded
        as any update, resumable), then the unmasking. A client the protocol leaves out (its
        message refused, too late, the round failed) ends the task with the coordinator's
        reason; one that sees the coordinator break the protocol ends it too.
        """
        server_round = int(task.server_round)
        started = time.monotonic()
        participant = self._participants.get(task.task_id)
        if participant is None:
            try:
                if is_local_dp:
                    raise SecAggError("the task asks for local DP and secure aggregation at once")
                participant = self._new_participant(SecAggTask.from_json(entry), reply.client_id)
            except SecAggError as exc:
                self._secagg_out(task, f"cannot take part in secure aggregation: {exc.message}")
                return
            self._participants[task.task_id] = participant
            while len(self._participants) > _SECAGG_KEPT:
                del self._participants[next(iter(self._participants))]
        send = self._secagg_sender(api, task, participant.task.stage_timeout_s)
        try:
            self._set_state("downloading", server_round)
            why = await exchange_keys(participant, send)
            if why is not None:
                self._secagg_out(task, why)
                return
            if not participant.has_uploaded:
                pending = self._pending.load(task.task_id)
                if pending is None:
                    pending = await self._masked_update(api, reply, task, participant, config)
                    if pending is None:
                        return  # the fit failed: reported, task ended
                self._set_state("uploading", server_round)
                chunk = int(reply.limits.max_chunk_bytes) or (1 << 20)
                try:
                    answer = await self._send(api, reply, pending, chunk)
                except InvalidInputError as exc:
                    self._pending.discard(task.task_id)
                    self._emit("rejected", server_round=server_round, reason=exc.message)
                    self._secagg_out(task, f"the coordinator refused the update: {exc.message}")
                    return
                self._pending.discard(task.task_id)
                if not answer.accepted:
                    self._emit("rejected", server_round=server_round, reason=answer.reason)
                    self._secagg_out(task, f"the coordinator refused the update: {answer.reason}")
                    return
                participant.has_uploaded = True
                participant.upload = (
                    int(pending.header.num_examples),
                    from_value_map(pending.header.metrics),
                    int(pending.header.size),
                )
                self._emit("masked", server_round=server_round, size=int(pending.header.size))
            self._set_state("idle", 0)
            why = await finish_unmasking(participant, send)
            if why is not None:
                self._secagg_out(task, why)
                return
        except SecAggError as exc:
            self._secagg_out(task, f"the coordinator broke the secure aggregation: {exc.message}")
            return
        if participant.refused_shares:
            self._emit(
                "shares_refused", server_round=server_round, senders=participant.refused_shares
            )
        self._set_state("idle", 0)
        self.rounds_done += 1
        num_examples, metrics, size = participant.upload
        self._emit(
            "uploaded",
            server_round=server_round,
            num_examples=num_examples,
            metrics=metrics,
            size=size,
            seconds=round(time.monotonic() - started, 3),
            secure=True,
        )

    def _new_participant(self, task: SecAggTask, client_id: str) -> SecAggParticipant:
        """This client's part in a round's secure aggregation (a subclass may wrap it)."""
        return SecAggParticipant(task, client_id)

    def _secagg_sender(
        self, api: CoordinatorClient, task: Task, stage_timeout_s: float
    ) -> Callable[[str, bytes], Any]:
        """The SecAgg stage calls of ``task``: each may wait for the stage to close."""

        async def send(stage: str, payload: bytes) -> SecAggAnswer:
            wait = max(0.0, task.deadline_unix - time.time()) + 2 * stage_timeout_s
            reply = await api.secagg(
                pb.SecAggMessage(
                    server_round=task.server_round,
                    task_id=task.task_id,
                    stage=stage,
                    payload=payload,
                ),
                timeout=wait + _SECAGG_SLACK_S,
            )
            return SecAggAnswer(reply.accepted, reply.reason, reply.stage, reply.payload)

        return send

    def _secagg_out(self, task: Task, reason: str) -> None:
        """This client is out of the round's secure aggregation: the task ends, with why."""
        server_round = int(task.server_round)
        log.error("round %d: %s", server_round, reason)
        self._participants.pop(task.task_id, None)
        self._pending.discard(task.task_id)
        self._emit("failed", server_round=server_round, reason=reason)
        self._end_task(task.task_id, server_round, reason)

    async def _masked_update(
        self,
        api: CoordinatorClient,
        reply: pb.JoinReply,
        task: Task,
        participant: SecAggParticipant,
        config: dict[str, Any],
    ) -> PendingUpload | None:
        """Fetch the model, fit, and write the masked input (kept for a resumed upload).

        Returns None when the fit failed (reported, the task ended).
        """
        server_round = int(task.server_round)
        model_path = await self._download(api, task.model_digest, server_round)
        self._set_state("training", server_round)
        try:
            update_path, num_examples, metrics = await _in_daemon_thread(
                self._train, model_path, config, None, self._training_progress(server_round)
            )
        except TaskError as exc:
            trace = exc.details.get("traceback")
            log.error("round %d: %s%s", server_round, exc.message, f"\n{trace}" if trace else "")
            self._participants.pop(task.task_id, None)
            self._emit("failed", server_round=server_round, reason=exc.message)
            self._set_state("failed", server_round, failure=exc.message)
            return None
        masked = update_path.with_name(update_path.name + ".masked")
        try:
            await asyncio.to_thread(
                participant.write_masked, model_path, update_path, num_examples, masked
            )
        except TaskError as exc:
            self._secagg_out(task, exc.message)
            return None
        finally:
            update_path.unlink(missing_ok=True)  # the plaintext update goes no further
        try:
            header = pb.UploadHeader(
                server_round=server_round,
                task_id=task.task_id,
                num_examples=num_examples,
                digest=await asyncio.to_thread(sha256_file, masked),
                size=masked.stat().st_size,
                codec="none",
                encoding=MASKED_ENCODING,
            )
            to_value_map(header.metrics, metrics)
            return self._pending.save(task.task_id, header, masked)
        finally:
            masked.unlink(missing_ok=True)

    async def _evaluate(self, api: CoordinatorClient, reply: pb.JoinReply, task: Task) -> None:
        """Evaluate the task's model with the task's ``evaluate``; report what it gave.

        An evaluate that raises (or returns something unusable) fails only this evaluation:
        the coordinator hears why, in one line, and the session goes on.
        """
        server_round = int(task.server_round)
        _, config = split_task(dict(task.config))
        report = pb.EvaluationReport(server_round=server_round, task_id=task.task_id)
        self._set_state("downloading", server_round)
        try:
            model_path = await self._download(api, task.model_digest, server_round)
        finally:
            self._set_state("idle", 0)
        try:
            loss, num_examples, metrics = await _in_daemon_thread(
                self._run_evaluate, model_path, config, int(reply.limits.max_metrics)
            )
        except TaskError as exc:
            trace = exc.details.get("traceback")
            log.error("round %d: %s%s", server_round, exc.message, f"\n{trace}" if trace else "")
            report.failure = exc.message
            self._emit("evaluate_failed", server_round=server_round, reason=exc.message)
        else:
            report.loss, report.num_examples = loss, num_examples
            to_value_map(report.metrics, metrics)
        try:
            answer = await api.report_evaluation(report)
        except InvalidInputError as exc:  # the coordinator judged the numbers: not the session
            log.error("round %d: the coordinator refused the evaluation: %s", server_round, exc)
            return
        if not answer.accepted:
            log.warning("round %d: evaluation not taken: %s", server_round, answer.reason)
        elif not report.failure:
            self._emit(
                "evaluated",
                server_round=server_round,
                loss=loss,
                num_examples=num_examples,
                metrics=metrics,
            )

    def _run_evaluate(
        self, model_path: Path, config: dict[str, Any], max_metrics: int = 0
    ) -> tuple[float, int, dict[str, float]]:
        """Run the user's evaluate in a worker thread; check what it returns.

        See :func:`flctl.client.evaluate_client`, which simulated clients run too.
        """
        return evaluate_client(self._client, model_path, config, max_metrics)

    def _remember_final(self, task_id: str, reason: str) -> None:
        """Keep ``task_id`` as ended for good (the most recent few hundred tasks)."""
        self._final[task_id] = reason
        while len(self._final) > _FINAL_TASKS_KEPT:
            del self._final[next(iter(self._final))]

    def _end_task(self, task_id: str, server_round: int, reason: str) -> None:
        """End a task for good: report it failed, with ``reason``, and never upload it again."""
        self._remember_final(task_id, reason)
        self._set_state("failed", server_round, failure=reason)

    async def _send(
        self, api: CoordinatorClient, reply: pb.JoinReply, pending: PendingUpload, chunk: int
    ) -> pb.UploadReply:
        """Upload ``pending`` from the offset the coordinator confirms; retry a lost race.

        ``BeginUpload`` finds the upload this identity began earlier for the same update (a
        dropped connection, a killed client, a restarted coordinator), so only the bytes the
        coordinator does not hold are sent again. The codec is chosen once per update, from
        its first MiB, the negotiated compression and this session's measured link rate.
        """
        header = pending.header
        server_round = int(header.server_round)
        decision = await asyncio.to_thread(
            self._choose_codec, reply, api, pending.path, self._server_is_local()
        )
        if decision.codec != CODEC_NONE:
            self._emit(
                "compressing",
                server_round=server_round,
                codec=decision.codec,
                ratio=round(decision.ratio, 3),
                reason=decision.reason,
            )
        level = reply.compression_level if reply.compression_level in LEVELS else 1
        last: FlctlError | None = None
        for attempt in range(_UPLOAD_ATTEMPTS):
            begun = await api.begin_upload(header)
            if not begun.accepted:
                return begun
            offset = int(begun.committed_offset)
            if offset:
                self._emit("resumed", server_round=server_round, offset=offset, size=header.size)
            resume = pb.UploadHeader()
            resume.CopyFrom(header)
            resume.upload_id = begun.upload_id
            resume.offset = offset
            resume.codec = decision.codec
            try:
                return await api.upload(
                    resume,
                    _file_chunks(
                        pending.path,
                        chunk,
                        self._progress("up", server_round),
                        offset=offset,
                        codec=decision.codec,
                        level=level,
                    ),
                )
            except (ConflictError, NotFoundError) as exc:
                # the coordinator still holds the stream that broke, or the upload was dropped
                last = exc
                await asyncio.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    def _server_is_local(self) -> bool:
        try:
            return is_loopback_host(split_address(self.server)[0])
        except FlctlError:
            return False

    @staticmethod
    def _choose_codec(
        reply: pb.JoinReply, api: CoordinatorClient, path: Path, loopback: bool = False
    ) -> Decision:
        codecs = [c for c in reply.codecs if c != CODEC_NONE and c in CODECS]
        if not codecs or reply.compression not in ("auto", "zstd"):
            return Decision(CODEC_NONE, "compression is off", 1.0, 0.0, 0.0, api.link.rate, 1.0)
        sample = b""
        if reply.compression == "auto" and not loopback:  # only "auto" over a network samples
            with path.open("rb") as handle:
                sample = handle.read(SAMPLE_BYTES)
        level = reply.compression_level if reply.compression_level in LEVELS else 1
        return choose_codec(
            reply.compression,
            sample,
            link_bytes_per_s=api.link.rate,
            level=level,
            codecs=codecs,
            loopback=loopback,
        )

    def _train(
        self,
        model_path: Path,
        config: dict[str, Any],
        privacy: TaskPrivacy | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> tuple[Path, int, dict[str, float]]:
        """Run the user's fit in a worker thread; check and write what it returns.

        The fit's ``context.report_progress`` calls go to ``on_progress``. The checks, and
        the update's encoding (``client.update_encoding`` and ``update_dtype``, or local DP
        when ``privacy`` asks for it), are :func:`flctl.client.fit_client`'s, which simulated
        clients run too; this chooses where the update is written (a training output in the
        cache's ``partial`` folder, named for this process) and, for a model from the cache,
        the base digest a delta records.
        """
        out = self._cache.root / "partial" / f"update-{os.getpid()}-{time.monotonic_ns()}"
        # the cache names a blob by its digest, which a delta records as its base
        is_cached = model_path.parent == self._cache.root / "blobs"
        num_examples, metrics = fit_client(
            self._client,
            model_path,
            config,
            out,
            update_encoding=self._options.update_encoding,
            update_dtype=self._options.update_dtype,
            privacy=privacy,
            base_digest=model_path.name if is_cached else None,
            on_progress=on_progress,
        )
        return out, num_examples, metrics


def _over_limits(limits: pb.Limits, metrics: Mapping[str, float], size: int) -> str | None:
    """Why the coordinator would refuse an update by the limits its JoinReply announced.

    Checked before uploading: an update over a limit is refused whole, and so would be each
    time it was sent again. A limit of 0 was not announced (an older coordinator).
    """
    if limits.max_metrics and len(metrics) > limits.max_metrics:
        return (
            f"fit returned {len(metrics)} metrics, more than the coordinator accepts "
            f"({limits.max_metrics}): return fewer from the task's fit"
        )
    if limits.max_update_bytes and size > limits.max_update_bytes:
        return (
            f"the update is {size} bytes, more than the coordinator accepts "
            f"({limits.max_update_bytes} bytes, transport.max_update_bytes)"
        )
    return None


async def _in_daemon_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` in a daemon thread and await its result.

    The user's fit runs here rather than in the default executor, whose threads the
    interpreter joins at exit: a client told to leave (SIGTERM) while a fit hangs then exits
    instead of waiting for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome: tuple[_T | None, BaseException | None] = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the client left
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="flctl-fit", daemon=True).start()
    return await future


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11, ``wait_for`` can
    swallow a cancellation that arrives as the event is set, which left a cancelled heartbeat
    loop running forever (and ``join --once`` never exiting).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def _file_chunks(
    path: Path,
    chunk_size: int,
    on_progress: Callable[[int, int], None],
    *,
    offset: int = 0,
    codec: str = CODEC_NONE,
    level: int = 1,
) -> AsyncIterator[bytes]:
    """The file from ``offset`` in chunks (each one compressed frame with a codec)."""
    total = path.stat().st_size
    done = offset
    with path.open("rb") as fh:
        fh.seek(offset)
        blocks = iter(lambda: fh.read(chunk_size), b"")
        async with contextlib.aclosing(compress_chunks(blocks, codec, level)) as stream:
            async for payload, _, raw_size in stream:
                yield payload
                done += raw_size
                on_progress(done, total)
