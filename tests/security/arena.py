"""A live coordinator for the security suite and the fuzzer, and a snapshot of its state.

:class:`Arena` starts a real coordinator (gRPC over mutual TLS on 127.0.0.1:0, real SQLite,
real blob folder) on an event loop kept for the whole session, with one round open:

- ``c1`` and ``c2`` joined and hold their task streams; the round selected both, so each has
  a task. ``c2``'s update is already accepted (so a second one is a duplicate); ``c1`` has
  not reported, so the round waits for it (deadline and rejoin grace: an hour);
- ``c3`` joined after the round started (not selected);
- revoked in the store before the coordinator starts: ``gone`` (every certificate), one
  extra certificate of ``c4`` by its serial (``arena.c4_old``; ``certs/c4.crt`` stays valid),
  and the admin ``ops-gone``;
- ``revokee`` is left for a test to revoke while its task stream is open.

:meth:`Arena.snapshot` reads everything a refusal must leave alone: every table of the state
database but the event log (read-only sqlite3, not the coordinator's own connection), and the
name and size of every file under ``blobs/`` (``tmp/`` included) and ``uploads/``.
:meth:`Snapshot.changes` says what differs, row by row and file by file.

Used by the tests in this folder and by ``bench/fuzz.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import grpc
import grpc.aio
import pytest

from flctl.coordinator import Coordinator
from flctl.core import Config, load_config
from flctl.core.errors import FlctlError
from flctl.security import (
    KeyPair,
    Role,
    TokenSigner,
    generate_project_certs,
    identity_from_pem,
    issue_certificate,
    load_ca,
    load_credentials,
)
from flctl.store import BlobStore, SqlStore, revoke
from flctl.tensors import TensorSpec, fingerprint, read_spec
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    AdminClient,
    CoordinatorClient,
    encode_upload,
    map_rpc_errors,
    pb,
    secure_channel,
)

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
TINY_TASK = REPO / "tests" / "integration" / "tiny_task.py"

#: Client identities with a certificate from the project's CA.
CLIENTS = ("c1", "c2", "c3", "c4", "gone", "revokee")
#: The arena's chunk size: small, so that several chunks make an update.
MAX_CHUNK = 65536
#: Input features of the tiny task's linear model: a 128 KiB update, three chunks.
IN_FEATURES = 16384


# ---------------------------------------------------------------------------------- snapshot


def _rows(db: sqlite3.Connection, table: str) -> tuple[tuple[Any, ...], ...]:
    names = [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
    rows = db.execute(f'SELECT * FROM "{table}"').fetchall()
    return tuple(sorted((tuple(zip(names, row, strict=True)) for row in rows), key=repr))


@dataclass(frozen=True)
class Snapshot:
    """What refusals must not change, and where the event log stood.

    Attributes:
        tables: Every table of ``state.db`` but ``events``: its rows as sorted tuples of
            ``(column, value)`` pairs.
        files: ``path relative to the state folder -> size`` for every file under ``blobs/``
            and ``uploads/``.
        last_event: The event log's last ``seq``.
    """

    tables: Mapping[str, tuple[tuple[Any, ...], ...]]
    files: Mapping[str, int]
    last_event: int

    @classmethod
    def take(cls, state_dir: Path) -> Snapshot:
        """Read the state folder (the database read-only, through its own connection)."""
        uri = f"file:{state_dir / 'state.db'}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=10.0)
        try:
            tables = [
                row[0]
                for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if row[0] != "events" and not row[0].startswith("sqlite_")
            ]
            contents = {table: _rows(db, table) for table in sorted(tables)}
            last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        finally:
            db.close()
        files: dict[str, int] = {}
        for folder in ("blobs", "uploads"):
            for path in sorted((state_dir / folder).rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(state_dir))] = path.stat().st_size
        return cls(contents, files, int(last))

    def changes(self, after: Snapshot) -> list[str]:
        """Every difference from this snapshot to ``after``, one line each (none: unchanged)."""
        out: list[str] = []
        for table in sorted(set(self.tables) | set(after.tables)):
            old, new = set(self.tables.get(table, ())), set(after.tables.get(table, ()))
            out += [f"{table}: removed {dict(row)}" for row in sorted(old - new, key=repr)]
            out += [f"{table}: added {dict(row)}" for row in sorted(new - old, key=repr)]
        for name in sorted(set(self.files) | set(after.files)):
            old_size, new_size = self.files.get(name), after.files.get(name)
            if old_size != new_size:
                out.append(f"file {name}: {old_size} -> {new_size} bytes")
        return out


def rejected_rows(before: Snapshot, after: Snapshot) -> list[dict[str, Any]]:
    """The ``updates`` rows added between two snapshots."""
    old = set(before.tables.get("updates", ()))
    return [dict(row) for row in after.tables.get("updates", ()) if row not in old]


def without_rejected(snapshot: Snapshot) -> Snapshot:
    """The snapshot with ``rejected`` update rows left out (they record refusals)."""
    tables = dict(snapshot.tables)
    tables["updates"] = tuple(
        row for row in tables.get("updates", ()) if dict(row).get("status") != "rejected"
    )
    return Snapshot(tables, snapshot.files, snapshot.last_event)


# ---------------------------------------------------------------------------------- tensors


def safetensors_bytes(
    tensors: Mapping[str, tuple[str, Sequence[int], bytes]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """A safetensors file in memory: ``name -> (dtype, shape, raw bytes)``, in name order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(tensors[n][2] for n in sorted(tensors))


_ELEMENT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b"}


def filled(dtype: str, count: int, value: float) -> bytes:
    """``count`` elements of ``dtype``, all ``value`` (little-endian)."""
    if dtype in _ELEMENT:
        code = _ELEMENT[dtype]
        return struct.pack(
            f"<{count}{code}", *([int(value)] * count if code in "qihb" else [value] * count)
        )
    return bytes([int(value) & 0xFF]) * count * (2 if dtype == "BF16" else 1)


def update_like(
    spec: Mapping[str, TensorSpec],
    *,
    value: float = 0.01,
    rename: Mapping[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    poison: Mapping[str, float] | None = None,
    extra: Mapping[str, tuple[str, Sequence[int]]] | None = None,
) -> bytes:
    """An update shaped like ``spec``, every value ``value``, with the changes asked for.

    ``poison`` sets the last element of the named tensors (NaN, Inf); ``extra`` adds tensors.
    """
    tensors: dict[str, tuple[str, Sequence[int], bytes]] = {}
    for name, tensor in spec.items():
        dtype = (dtypes or {}).get(name, tensor.dtype)
        shape = tuple((shapes or {}).get(name, tensor.shape))
        count = 1
        for dim in shape:
            count *= dim
        data = bytearray(filled(dtype, count, value))
        if poison and name in poison:
            size = struct.calcsize(_ELEMENT[dtype])
            data[-size:] = struct.pack(f"<{_ELEMENT[dtype]}", poison[name])
        tensors[(rename or {}).get(name, name)] = (dtype, shape, bytes(data))
    for name, (dtype, shape) in (extra or {}).items():
        count = 1
        for dim in shape:
            count *= dim
        tensors[name] = (dtype, shape, filled(dtype, count, value))
    return safetensors_bytes(tensors)


def digest_of(data: bytes) -> str:
    """The sha256 hex digest the protocol addresses bytes by."""
    return hashlib.sha256(data).hexdigest()


async def pieces(data: bytes, size: int = MAX_CHUNK) -> AsyncIterator[bytes]:
    """``data`` in chunks of ``size`` bytes, as an upload's data messages."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# ---------------------------------------------------------------------------------- errors


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC status a flctl error was translated from (raised ``from`` the RpcError)."""
    cause = error.__cause__
    assert isinstance(cause, grpc.RpcError), f"{error!r} was not translated from a gRPC status"
    code: grpc.StatusCode = cause.code()  # type: ignore[attr-defined]
    return code


# ---------------------------------------------------------------------------------- arena


def write_project(root: Path, **sections: Mapping[str, Any]) -> Config:
    """Write ``flctl.toml`` (the tiny task, long deadlines) with ``sections`` overriding."""
    base: dict[str, dict[str, Any]] = {
        "project": {"task": "tiny_task.py", "seed": 1},
        "server": {
            "address": "127.0.0.1:0",
            "heartbeat_interval_s": 5.0,
            "heartbeat_timeout_s": 3600.0,
            "rate_limit_per_s": 0.0,
        },
        "rounds": {
            "min_clients": 2,
            "deadline_s": 3600.0,
            "quorum_timeout_s": 30.0,
            "rejoin_grace_s": 3600.0,
        },
        "transport": {"max_chunk_bytes": MAX_CHUNK},
        "data": {"num_partitions": 3},
        "task": {"lr": 0.1, "in_features": IN_FEATURES},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    (root / "flctl.toml").write_text("\n".join(lines) + "\n")
    shutil.copy(TINY_TASK, root / "tiny_task.py")
    return load_config(root / "flctl.toml")


@dataclass
class Member:
    """One client of the arena: its certificate, its joined session, its task (if selected)."""

    name: str
    api: CoordinatorClient
    joined: pb.JoinReply
    task: pb.Task | None = None
    stream: asyncio.Task[None] | None = None
    stream_error: list[BaseException] = field(default_factory=list)


class Arena:
    """A coordinator with one round open, and the clients and admins that talk to it.

    Build it with :meth:`start`; run coroutines on its loop with :meth:`run`; end it with
    :meth:`close`.
    """

    def __init__(self, root: Path, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.root = root
        self.config = config
        self.loop = loop
        self.coordinator = Coordinator(config)
        self.state_dir = config.state_path
        self.certs = config.certs_path
        self.address = ""
        self.members: dict[str, Member] = {}
        self.signer: TokenSigner | None = None
        self.server_round = 0
        self.spec: dict[str, TensorSpec] = {}
        self.task_fingerprint = ""
        self.head_digest = ""
        self.limits: pb.Limits | None = None
        self.c4_old: KeyPair | None = None
        self.ops_gone: KeyPair | None = None
        self._closing: list[Any] = []

    # ------------------------------------------------------------------ building

    @classmethod
    def start(
        cls,
        root: Path,
        loop: asyncio.AbstractEventLoop,
        *,
        open_round: bool = True,
        c2_reports: bool = True,
        **sections: Mapping[str, Any],
    ) -> Arena:
        """Make the project under ``root``, start the coordinator, open the round.

        Args:
            root: The project folder (made).
            loop: The loop the coordinator runs on.
            open_round: Start the round (else c1 and c2 only join).
            c2_reports: Have c2's update accepted (then only c1 keeps the round open).
            sections: ``flctl.toml`` tables overriding the arena's.
        """
        root.mkdir(parents=True, exist_ok=True)
        config = write_project(root, **sections)
        generate_project_certs(config.certs_path, list(CLIENTS))
        arena = cls(root, config, loop)
        arena._prepare_revocations()
        arena.run(arena._start(open_round, c2_reports), timeout=120)
        return arena

    def _prepare_revocations(self) -> None:
        """Revocations recorded while no coordinator runs (author ``local``)."""
        ca = load_ca(self.certs)
        self.c4_old = issue_certificate(ca, "c4", Role.CLIENT)
        self.ops_gone = issue_certificate(ca, "ops-gone", Role.ADMIN)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with SqlStore.open(self.state_dir) as store:
            revoke(store, "gone", reason="left the consortium")
            revoke(store, "c4", serial=identity_from_pem(self.c4_old.cert_pem).serial)
            revoke(store, "ops-gone", reason="an operator who left")

    async def _start(self, open_round: bool, c2_reports: bool) -> None:
        captured: list[TokenSigner] = []
        generate = TokenSigner.generate

        def capture() -> TokenSigner:
            signer = generate()
            captured.append(signer)
            return signer

        # the coordinator draws its token key at start; the suite keeps it to mint tokens
        # (expired ones, ones for another identity) that only the real key can sign
        with mock.patch.object(TokenSigner, "generate", capture):
            self.address = await self.coordinator.start()
        (self.signer,) = captured
        store = self.store
        head = store.head()
        assert head is not None
        self.head_digest = head.digest
        self.spec = read_spec(BlobStore(self.state_dir / "blobs").path(head.digest))
        self.task_fingerprint = fingerprint(self.spec)
        for name in ("c1", "c2"):
            await self.join(name)
        if not open_round:
            return
        for name in ("c1", "c2"):
            self._follow(self.members[name])
        await self.until(lambda: len(self.coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
        admin = self.admin()
        (self.server_round,) = (await admin.start_round(1)).round_ids
        await self.until(lambda: all(self.members[n].task for n in ("c1", "c2")))
        if c2_reports:  # its next update for the round is a duplicate
            c2 = self.members["c2"]
            assert c2.task is not None
            data = update_like(self.spec, value=0.02)
            reply = await c2.api.upload(self.header(c2.task, data), pieces(data))
            assert reply.accepted, reply.reason
            # its scores are written in the background: before any test takes a snapshot
            store = self.coordinator.store
            assert store is not None
            await self.until(
                lambda: all(
                    u.scores is not None
                    for u in store.updates_for_round(self.server_round, status="accepted")
                )
            )
        await self.join("c3")

    def _follow(self, member: Member) -> None:
        async def follow() -> None:
            try:
                async for task in member.api.tasks():
                    member.task = task
            except FlctlError as exc:
                member.stream_error.append(exc)

        member.stream = self.loop.create_task(follow())

    # ------------------------------------------------------------------ running

    def run(self, awaitable: Awaitable[T], timeout: float = 30.0) -> T:
        """Run ``awaitable`` on the arena's loop, failing after ``timeout`` seconds."""
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, timeout))

    async def until(self, predicate: Any, timeout: float = 20.0) -> None:
        """Wait until ``predicate()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.02)

    @property
    def store(self) -> SqlStore:
        """The coordinator's own store (for reads the snapshot does not cover)."""
        store = self.coordinator.store
        assert store is not None
        return store

    def snapshot(self) -> Snapshot:
        """See :class:`Snapshot`."""
        return Snapshot.take(self.state_dir)

    def events_after(self, before: Snapshot) -> list[Any]:
        """Events appended since ``before`` was taken."""
        return self.store.events_since(before.last_event, limit=100_000)

    def assert_unchanged(self, before: Snapshot, *, rejected: int = 0) -> list[dict[str, Any]]:
        """Fail unless the state is as in ``before``, but for ``rejected`` new refusal rows.

        A well-formed update refused for the round's state is recorded as a ``rejected`` row
        in ``updates`` (docs/security.md); nothing else may differ. Returns those rows.
        """
        after = self.snapshot()
        added = rejected_rows(before, after)
        assert [row["status"] for row in added] == ["rejected"] * rejected, added
        tables = dict(after.tables)
        tables["updates"] = tuple(r for r in tables.get("updates", ()) if dict(r) not in added)
        changes = before.changes(Snapshot(tables, after.files, after.last_event))
        assert changes == [], "a refusal changed the state:\n" + "\n".join(changes)
        return added

    def refused(
        self,
        awaitable: Awaitable[Any],
        error: type[FlctlError],
        status: grpc.StatusCode,
        match: str,
        *,
        timeout: float = 30.0,
    ) -> FlctlError:
        """Run ``awaitable``; it must raise exactly ``error``, from ``status``, saying ``match``."""
        with pytest.raises(FlctlError) as info:
            self.run(awaitable, timeout=timeout)
        raised = info.value
        assert type(raised) is error, f"{type(raised).__name__} ({raised.message}), not {error}"
        assert grpc_status(raised) == status, (grpc_status(raised), raised.message)
        assert re.search(match, raised.message), raised.message
        return raised

    def refusal_events(self, before: Snapshot, type_: str) -> list[Any]:
        """The events of ``type_`` appended since ``before``."""
        return [e for e in self.events_after(before) if e.type == type_]

    # ------------------------------------------------------------------ callers

    def channel(self, cert_pem: bytes, key_pem: bytes) -> grpc.aio.Channel:
        """A mutual-TLS channel to the coordinator with this certificate and key."""
        ca_pem = (self.certs / "ca.crt").read_bytes()
        channel = secure_channel(self.address, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)
        self._closing.append(channel)
        return channel

    def credentials(self, name: str) -> tuple[bytes, bytes]:
        """The certificate and key of ``name`` from the project's folder."""
        cert, key, _ = load_credentials(self.certs, name)
        return cert, key

    def client(self, name: str | None = None, *, pair: KeyPair | None = None) -> CoordinatorClient:
        """A Coordinator caller (not joined) with ``name``'s certificate, or ``pair``."""
        cert, key = (pair.cert_pem, pair.key_pem) if pair else self.credentials(name or "")
        return CoordinatorClient(self.channel(cert, key))

    def admin(self, name: str = "admin", *, pair: KeyPair | None = None) -> AdminClient:
        """An Admin caller with ``name``'s certificate (or ``pair``)."""
        cert, key = (pair.cert_pem, pair.key_pem) if pair else self.credentials(name)
        return AdminClient(self.channel(cert, key))

    def join_request(self, **fields: Any) -> pb.JoinRequest:
        """A JoinRequest that matches the coordinator's task, with ``fields`` changed."""
        values: dict[str, Any] = {
            "protocol_version": PROTOCOL_VERSION,
            "task_fingerprint": self.task_fingerprint,
        }
        values.update(fields)
        return pb.JoinRequest(**values)

    async def join(self, name: str) -> Member:
        """Join as ``name`` on a channel of its own; keep the session."""
        api = self.client(name)
        reply = await api.join(self.join_request())
        self.limits = reply.limits
        member = self.members[name] = Member(name, api, reply)
        return member

    def header(self, task: pb.Task, data: bytes, **fields: Any) -> pb.UploadHeader:
        """An upload header for ``task`` announcing ``data``, with ``fields`` changed."""
        values: dict[str, Any] = {
            "server_round": task.server_round,
            "task_id": task.task_id,
            "num_examples": 10,
            "digest": digest_of(data),
            "size": len(data),
        }
        values.update(fields)
        return pb.UploadHeader(**values)

    async def raw_upload(self, api: CoordinatorClient, items: Iterable[Any]) -> pb.UploadReply:
        """An Upload whose messages are exactly ``items`` (headers or bytes), in order."""
        call = api.channel.stream_unary(
            "/flctl.v1.Coordinator/Upload",
            request_serializer=encode_upload,
            response_deserializer=pb.UploadReply.FromString,
        )

        async def messages() -> AsyncIterator[Any]:
            for item in items:
                yield item

        with map_rpc_errors():
            reply: pb.UploadReply = await call(messages(), metadata=api.metadata(), timeout=30)
        return reply

    # ------------------------------------------------------------------ ending

    def close(self) -> None:
        """Stop the coordinator, close every channel, end the streams."""

        async def stop() -> None:
            for member in self.members.values():
                if member.stream is not None:
                    member.stream.cancel()
            streams = [m.stream for m in self.members.values() if m.stream is not None]
            await asyncio.gather(*streams, return_exceptions=True)
            for channel in self._closing:
                await channel.close()
            await self.coordinator.stop()

        self.run(stop(), timeout=60)


#: The X.509 extension in which flctl certificates state their role (docs/security.md).
ROLE_OID = "2.25.195139702004034198723160602002407159307.1"


def odd_role_certificate(
    ca: KeyPair, name: str, *, unit: str | None, extension: str | None
) -> KeyPair:
    """A client-auth certificate from ``ca`` whose role statements are ``unit`` (the subject's
    OU) and ``extension`` (flctl's role extension); None leaves one out."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if unit is not None:
        names.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    start = not_before(-1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if extension is not None:
        value = extension.encode()
        der = bytes([0x0C, len(value)]) + value  # a DER UTF8String
        oid = x509.ObjectIdentifier(ROLE_OID)
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, der), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def not_before(days: float) -> datetime:
    """A validity start ``days`` from now (negative: in the past)."""
    return datetime.now(UTC) + timedelta(days=days)
