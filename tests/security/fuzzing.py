"""Random and mutated protobuf messages for every RPC of both services, and what they must do.

One generator (:func:`generate`) turns a seeded :class:`random.Random` into one call: random
bytes, a valid message mutated byte by byte (bit flips, insertions, deletions, truncation,
duplicated slices, extra fields of any wire type, over-long varints and lengths), or a valid
message with fields set to extreme values (huge and negative numbers, NaN and Inf, path-like,
long and odd Unicode strings, thousands of repeated and map entries). ``Upload`` sends a
sequence of such messages (a header, then data, reordered, dropped, duplicated or replaced) or,
for about a quarter of them, a well-formed upload followed by more data than its header announces
(the other mutations seldom leave a header intact, so they seldom reach the size bounds).
The valid messages (:class:`Seeds`) come from the live coordinator: its task's fingerprint, the
head model's digest, ``c1``'s task in the open round, a well-formed update whose header carries
a digest of other bytes (so no mutation can make it acceptable), evaluation reports for that
task (the round evaluates nothing, so none can be accepted).

:class:`Fuzzer` sends the calls with valid credentials (``c1``'s certificate and its current
session token for the Coordinator service, ``admin``'s for the Admin service) as raw bytes, so
that malformed bytes reach the server exactly as generated, and records how each ended. The
invariants: every call ends with a gRPC status within its deadline (only the following streams,
Tasks and Watch, may run into it), no handler fails unexpectedly (INTERNAL from flctl), the
coordinator still answers, and the state is as before (:meth:`Fuzzer.view`).

Admin calls that would be accepted changes (start a round, revoke, roll back, tag, cancel,
evict) are not sent (counted as ``skipped``): they change state by design. Used by
``tests/security/test_fuzz.py`` (a few hundred calls) and ``bench/fuzz.py`` (thousands).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from flctl.core.errors import FlctlError
from flctl.store import BlobStore
from flctl.transport import compress_chunk
from flctl.transport.grpc import pb, secure_channel
from flctl.transport.grpc._status import GRPC_CORE_INTERNAL  # gRPC core resetting a stream
from tests.security.arena import Arena, Snapshot, digest_of, update_like

# ---------------------------------------------------------------------------------- arena


def start_fuzz_arena(root: Path, loop: asyncio.AbstractEventLoop) -> Arena:
    """The fuzzer's coordinator: a small model, 4 KiB chunks, no rate limit, and c2 has not
    reported, so the round stays open for both c1 and c2 whatever c1's calls say."""
    return Arena.start(
        root,
        loop,
        c2_reports=False,
        task={"lr": 0.1, "in_features": 1024},
        transport={"max_chunk_bytes": 4096},
    )


# ---------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One RPC: its path, shape, request message and who calls it."""

    service: str
    method: str
    kind: str  # "unary", "server-stream" or "client-stream"
    request: type[Message]

    @property
    def path(self) -> str:
        """The RPC's path on the wire."""
        return f"/flctl.v1.{self.service}/{self.method}"

    @property
    def follows(self) -> bool:
        """A stream that follows the coordinator until it ends (may run into its deadline)."""
        return self.method in ("Tasks", "Watch")


COORDINATOR_TARGETS = [
    Target("Coordinator", "Join", "unary", pb.JoinRequest),
    Target("Coordinator", "Heartbeat", "unary", pb.HeartbeatRequest),
    Target("Coordinator", "Tasks", "server-stream", pb.TasksRequest),
    Target("Coordinator", "Download", "server-stream", pb.DownloadRequest),
    Target("Coordinator", "Upload", "client-stream", pb.UploadChunk),
    Target("Coordinator", "BeginUpload", "unary", pb.UploadHeader),
    Target("Coordinator", "RenewToken", "unary", pb.RenewTokenRequest),
    Target("Coordinator", "ReportEvaluation", "unary", pb.EvaluationReport),
    Target("Coordinator", "SecAgg", "unary", pb.SecAggMessage),
]
ADMIN_TARGETS = [
    Target("Admin", "StartRound", "unary", pb.StartRoundRequest),
    Target("Admin", "Status", "unary", pb.StatusRequest),
    Target("Admin", "ListClients", "unary", pb.ListClientsRequest),
    Target("Admin", "ListModels", "unary", pb.ListModelsRequest),
    Target("Admin", "Revoke", "unary", pb.RevokeRequest),
    Target("Admin", "Rollback", "unary", pb.RollbackRequest),
    Target("Admin", "Tag", "unary", pb.TagRequest),
    Target("Admin", "CancelRound", "unary", pb.CancelRoundRequest),
    Target("Admin", "Evict", "unary", pb.EvictRequest),
    Target("Admin", "Watch", "server-stream", pb.WatchRequest),
    Target("Admin", "ListEvents", "unary", pb.ListEventsRequest),
]
TARGETS = COORDINATOR_TARGETS + ADMIN_TARGETS


# ---------------------------------------------------------------------------------- seeds


@dataclass
class Seeds:
    """Valid serialized messages per RPC; for ``Upload``, headers and the data that follows.

    An upload header's digest is drawn anew for most calls (:func:`generate`), so that each
    upload is a new one rather than the resumption of an earlier one with the same header.
    """

    messages: dict[str, list[bytes]] = field(default_factory=dict)
    uploads: list[tuple[pb.UploadHeader, list[bytes]]] = field(default_factory=list)

    @classmethod
    def from_arena(cls, arena: Arena) -> Seeds:
        """Build them from the live coordinator's task, head model and open round."""
        task = arena.members["c1"].task
        assert task is not None
        size = BlobStore(arena.state_dir / "blobs").size(arena.head_digest)
        chunk = int(arena.config.transport.max_chunk_bytes)
        data = update_like(arena.spec, value=0.125)
        wrong = digest_of(data + b"another update")  # no mutation can make the bytes match

        def header(**fields: Any) -> pb.UploadHeader:
            values: dict[str, Any] = {
                "server_round": task.server_round,
                "task_id": task.task_id,
                "num_examples": 32,
                "digest": wrong,
                "size": len(data),
            }
            values.update(fields)
            out = pb.UploadHeader(**values)
            out.metrics["loss"].double_value = 0.5
            return out

        join = arena.join_request(client_version="fuzz", codecs=["none", "zstd"])
        join.properties["model_spec"].string_value = "{}"
        seeds = cls()
        add = seeds.messages.setdefault
        add("Join", []).append(join.SerializeToString())
        add("Heartbeat", []).extend(
            m.SerializeToString()
            for m in (
                pb.HeartbeatRequest(state="training", server_round=task.server_round, progress=0.5),
                pb.HeartbeatRequest(
                    state="uploading", bytes_done=10, bytes_total=100, bytes_per_s=1e6
                ),
            )
        )
        add("Tasks", []).append(b"")
        add("Download", []).extend(
            m.SerializeToString()
            for m in (
                pb.DownloadRequest(digest=arena.head_digest, codecs=["zstd"]),
                pb.DownloadRequest(digest=arena.head_digest, offset=size - 7),
            )
        )
        add("BeginUpload", []).extend(
            h.SerializeToString() for h in (header(), header(codec="zstd"), header(offset=5))
        )
        add("RenewToken", []).append(b"")
        # the open round is not a secure one: each stage is refused (accepted=false) after the
        # handler has parsed and checked it
        add("SecAgg", []).extend(
            pb.SecAggMessage(
                server_round=task.server_round, task_id=task.task_id, stage=stage, payload=body
            ).SerializeToString()
            for stage, body in (
                ("advertise_keys", b'{"c_pk": "", "s_pk": ""}'),
                ("unmask", b"{}"),
                ("masked_input", b""),
            )
        )
        # the open round evaluates nothing: valid reports are refused (accepted=false), so the
        # fuzzer reaches the handler's checks of the numbers and of the task without changes
        evaluated = pb.EvaluationReport(
            server_round=task.server_round, task_id=task.task_id, loss=0.5, num_examples=32
        )
        evaluated.metrics["accuracy"].double_value = 0.75
        evaluated.metrics["batches"].int_value = 4
        add("ReportEvaluation", []).extend(
            m.SerializeToString()
            for m in (
                evaluated,
                pb.EvaluationReport(
                    server_round=task.server_round,
                    task_id=task.task_id,
                    failure="evaluate raised ValueError: no test data",
                ),
            )
        )
        raw = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        packed = [compress_chunk(piece, 1, codec="zstd") for piece in raw]
        for first, rest in ((header(), raw), (header(codec="zstd"), packed)):
            seeds.uploads.append(
                (first, [pb.UploadChunk(data=piece).SerializeToString() for piece in rest])
            )
        open_round = task.server_round
        admin: dict[str, list[Message]] = {
            "StartRound": [pb.StartRoundRequest(rounds=1)],
            "Status": [pb.StatusRequest(round_ids=[open_round]), pb.StatusRequest()],
            "ListClients": [pb.ListClientsRequest()],
            "ListModels": [pb.ListModelsRequest(limit=3)],
            "Revoke": [pb.RevokeRequest(identity="nobody", serial="1f", reason="fuzz")],
            "Rollback": [pb.RollbackRequest(ref="1", reason="fuzz")],
            "Tag": [pb.TagRequest(ref="1", name="fuzz-tag")],
            "CancelRound": [pb.CancelRoundRequest(round_ids=[open_round + 7], reason="fuzz")],
            "Evict": [
                pb.EvictRequest(client_id="nobody", reason="fuzz"),
                pb.EvictRequest(client_id="c2", reason="fuzz"),
            ],
            "Watch": [pb.WatchRequest(since_seq=0, no_follow=True)],
            "ListEvents": [
                pb.ListEventsRequest(limit=5, type="round"),
                pb.ListEventsRequest(before_seq=3, type="admin", server_round=open_round),
            ],
        }
        for method, requests in admin.items():
            add(method, []).extend(r.SerializeToString() for r in requests)
        return seeds


# ---------------------------------------------------------------------------------- values

_LONG = [64, 65, 129, 256, 257, 1025, 4097, 70000]
_TEXT = [
    "",
    "..",
    "../../../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows\\win.ini",
    "\x00",
    "a\x00b",
    "c2",
    "admin",
    "head",
    "1",
    "-1",
    "0x10",
    "1e309",
    "nan",
    "\u202eevil",
    "\U0001f600",
    "%s%n%x",
    "'; DROP TABLE rounds; --",
    "0" * 64,
    "f" * 64,
]
_INTS = {
    FieldDescriptor.TYPE_UINT64: [0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1],
    FieldDescriptor.TYPE_UINT32: [0, 1, 2**31 - 1, 2**31, 2**32 - 1],
    FieldDescriptor.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63)],
    FieldDescriptor.TYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31)],
}
_DOUBLES = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 0.5, 2.0**64]


def _text(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(_TEXT)
    if roll < 0.8:
        return rng.choice("ax/.0") * rng.choice(_LONG)
    # random code points, none of them surrogates (protobuf strings are valid UTF-8)
    points = [rng.choice([rng.randrange(1, 0xD800), rng.randrange(0xE000, 0x110000)])]
    points += [rng.randrange(1, 0xD800) for _ in range(rng.randrange(0, 40))]
    return "".join(map(chr, points))


def _scalar(rng: random.Random, fd: FieldDescriptor) -> Any:
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _text(rng)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 8, 100, 4096]))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(_DOUBLES)
    return rng.choice(_INTS.get(fd.type, [0, 1]))


def _set_field(rng: random.Random, message: Message, depth: int = 0) -> None:
    """Set one field of ``message`` (chosen at random) to an extreme value."""
    fields = message.DESCRIPTOR.fields
    if not fields:
        return
    fd: Any = rng.choice(fields)  # protobuf's stubs: the Python or the upb FieldDescriptor
    value = getattr(message, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        for _ in range(rng.choice([1, 3, 65, 2000])):
            key = _text(rng) if rng.random() < 0.3 else f"k{rng.randrange(10**6)}"
            if value_fd.message_type is None:
                value[key] = _scalar(rng, value_fd)
            else:
                _set_field(rng, value[key], depth + 1)
    elif fd.is_repeated:
        count = rng.choice([1, 2, 100, 5000])
        if fd.message_type is None:
            value.extend(_scalar(rng, fd) for _ in range(count))
        else:
            for _ in range(min(count, 100)):
                _set_field(rng, value.add(), depth + 1)
    elif fd.message_type is not None:
        if depth < 3:
            _set_field(rng, value, depth + 1)
    else:
        setattr(message, fd.name, _scalar(rng, fd))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mutate_bytes(rng: random.Random, data: bytes, splice: Sequence[bytes]) -> bytes:
    """Apply one to four byte-level mutations to ``data``."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(10)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip one bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # one random byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            out[at:at] = rng.randbytes(rng.choice([1, 2, 4, 16, 300]))
        elif op == 3 and out:  # delete a range
            out[at : at + rng.randrange(1, 64)] = b""
        elif op == 4:  # truncate
            del out[at:]
        elif op == 5 and out:  # duplicate a slice
            end = min(len(out), at + rng.randrange(1, 128))
            out[at:at] = out[at:end] * rng.choice([1, 2, 50])
        elif op == 6:  # append a field of any number and wire type
            tag = (rng.choice([1, 2, 3, 5, 8, 15, 16, 2047, 2**29 - 1]) << 3) | rng.randrange(8)
            body = rng.choice([_varint(rng.randrange(2**64)), rng.randbytes(4), rng.randbytes(8)])
            if tag & 7 == 2:
                body = _varint(rng.choice([0, 3, 2**31, 2**64 - 1])) + rng.randbytes(3)
            out += _varint(tag) + body
        elif op == 7:  # an over-long varint (11 continuation bytes)
            out[at:at] = b"\xff" * 10 + b"\x01"
        elif op == 8 and splice:  # merge another valid message in (protobuf merges fields)
            out += rng.choice(splice)
        else:  # a length-delimited field that claims more than there is
            out[at:at] = bytes([0x12]) + _varint(rng.choice([1 << 20, 2**31, 2**63]))
    return bytes(out)


# ---------------------------------------------------------------------------------- calls


@dataclass(frozen=True)
class Call:
    """One generated call: its target, its request message(s), and how they were made."""

    target: Target
    messages: tuple[bytes, ...]
    origin: str


def _random_message(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 300, 4096]))


def _structured(rng: random.Random, target: Target, seed: bytes) -> bytes:
    try:
        message = target.request.FromString(seed)
    except DecodeError:  # an earlier mutation broke it: mutate its bytes instead
        return _mutate_bytes(rng, seed, ())
    for _ in range(rng.randrange(1, 3)):
        _set_field(rng, message)
    return message.SerializeToString()


def _one(rng: random.Random, target: Target, seed: bytes, splice: Sequence[bytes]) -> bytes:
    return (
        _mutate_bytes(rng, seed, splice) if rng.random() < 0.6 else _structured(rng, target, seed)
    )


def generate(rng: random.Random, target: Target, seeds: Seeds) -> Call:
    """One call to ``target``: random bytes (a fifth), else a valid message mutated.

    For ``Upload``: random messages (a fifth), else a valid upload that overruns its header's
    size (0.8 x 0.3 of the calls), else a valid upload with one or two mutations.
    """
    if target.kind == "client-stream":
        if rng.random() < 0.2:
            count = rng.randrange(1, 4)
            return Call(target, tuple(_random_message(rng) for _ in range(count)), "random")
        template, data = rng.choice(seeds.uploads)
        header = pb.UploadHeader()
        header.CopyFrom(template)
        if rng.random() < 0.8:  # a new upload (else: the one begun with the seed's digest)
            header.digest = rng.randbytes(32).hex()
        sequence = [pb.UploadChunk(header=header).SerializeToString(), *data]
        if rng.random() < 0.3:  # well-formed, then more data than the header announces
            sequence.extend(rng.choice(data) for _ in range(rng.randrange(1, 3)))
            return Call(target, tuple(sequence), "overrun")
        for _ in range(rng.randrange(1, 3)):
            op = rng.randrange(6)
            i = rng.randrange(len(sequence))
            if op <= 2:  # mutate one message (the header most often)
                i = 0 if op == 0 else i
                sequence[i] = _one(rng, target, sequence[i], sequence)
            elif op == 3 and len(sequence) > 1:  # drop one
                del sequence[i]
            elif op == 4:  # duplicate one
                sequence.insert(i, sequence[i])
            else:  # swap two
                j = rng.randrange(len(sequence))
                sequence[i], sequence[j] = sequence[j], sequence[i]
        return Call(target, tuple(sequence), "mutated")
    if rng.random() < 0.2:
        return Call(target, (_random_message(rng),), "random")
    pool = seeds.messages[target.method]
    seed = rng.choice(pool)
    if target.method == "BeginUpload" and rng.random() < 0.8:
        header = pb.UploadHeader.FromString(seed)
        header.digest = rng.randbytes(32).hex()
        seed = header.SerializeToString()
    if rng.random() < 0.6:
        return Call(target, (_mutate_bytes(rng, seed, pool),), "mutated")
    return Call(target, (_structured(rng, target, seed),), "structured")


# ---------------------------------------------------------------------------------- admin changes

_SERIAL = re.compile(r"[0-9a-f]{1,40}")


def is_admin_change(
    target: Target,
    payload: bytes,
    *,
    open_round: int,
    resolves: Callable[[str], bool],
    has_session: Callable[[str], bool],
) -> bool:
    """Whether an Admin request would be accepted as a change of state (so it is not sent).

    Errs on the side of True: a request it lets through that changes state fails the run.

    Args:
        target: The RPC.
        payload: Its request, serialized.
        open_round: The coordinator's open round.
        resolves: Whether a model ref names a version.
        has_session: Whether a client id has an open session (Evict would end it).
    """
    if target.service != "Admin":
        return False
    try:
        request: Any = target.request.FromString(payload)
    except DecodeError:
        return False  # refused by gRPC before any handler
    method = target.method
    if method == "StartRound":
        return bool(1 <= request.rounds <= 10_000)
    if method == "Revoke":
        serial_ok = request.serial == "" or (
            _SERIAL.fullmatch(request.serial) is not None and int(request.serial, 16) > 0
        )
        return serial_ok and 1 <= len(request.identity) <= 255 and len(request.reason) <= 1024
    if method in ("Rollback", "Tag"):
        return len(request.ref) <= 256 and resolves(request.ref)
    if method == "CancelRound":
        ids = set(request.round_ids)
        return len(request.reason) <= 1024 and (not ids or open_round in ids or request.queued)
    if method == "Evict":
        return (
            len(request.client_id) <= 255
            and len(request.reason) <= 1024
            and has_session(request.client_id)
        )
    return False


# ---------------------------------------------------------------------------------- sending

#: What flctl answers for an unexpected exception in a handler: a bug.
FLCTL_INTERNAL = "internal error (see the coordinator's log)"


@dataclass
class Outcome:
    """How one call ended, and what was wrong with that (None: nothing)."""

    status: grpc.StatusCode
    details: str
    seconds: float
    problem: str | None = None


@dataclass
class Tally:
    """Counts over a run."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    origins: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    rejoins: int = 0
    unexpected: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        """Calls sent."""
        return sum(self.statuses.values())

    def by_status(self) -> dict[str, int]:
        """Calls per status code, all RPCs together."""
        out: Counter[str] = Counter()
        for (_, status), count in self.statuses.items():
            out[status] += count
        return dict(sorted(out.items()))

    def by_rpc(self) -> dict[str, dict[str, int]]:
        """Calls per RPC and status code."""
        out: dict[str, dict[str, int]] = {}
        for (method, status), count in sorted(self.statuses.items()):
            out.setdefault(method, {})[status] = count
        return out


class Fuzzer:
    """Sends generated calls to an arena's coordinator and checks what they did.

    Args:
        arena: A live coordinator with ``c1`` selected in its open round.
        stream_deadline_s: Deadline of a following stream (Tasks, Watch).
        call_deadline_s: Deadline of every other call; running into it is a hang.
    """

    def __init__(
        self, arena: Arena, *, stream_deadline_s: float = 0.15, call_deadline_s: float = 10.0
    ) -> None:
        self.arena = arena
        self.seeds = Seeds.from_arena(arena)
        self.tally = Tally()
        self._stream_deadline = stream_deadline_s
        self._deadline = call_deadline_s
        # channels of their own, whose send bound (16 MiB) lets oversize messages reach the
        # coordinator's own bound (one chunk plus 64 KiB)
        ca = (arena.certs / "ca.crt").read_bytes()
        self._channels = {
            service: secure_channel(
                arena.address, cert_pem=cert, key_pem=key, ca_pem=ca, max_chunk_bytes=16 << 20
            )
            for service, (cert, key) in (
                ("Coordinator", arena.credentials("c1")),
                ("Admin", arena.credentials("admin")),
            )
        }
        self._token = arena.members["c1"].joined.session_token
        self._session = arena.members["c1"].joined.session_id

    # ------------------------------------------------------------------ state

    def view(self) -> Snapshot:
        """The state the fuzzer must not change.

        Left out: what records the calls themselves or follows from accepted ones: the event
        log, ``rejected`` update rows, c1's liveness (``clients.state``, ``last_seen``) and the
        bytes it downloaded, and ``uploads/`` (begun uploads wait there for their round to end:
        :meth:`staging` checks that they go).
        """
        snapshot = self.arena.snapshot()
        volatile = {"state", "last_seen", "bytes_down"}
        tables = dict(snapshot.tables)
        tables["clients"] = tuple(
            tuple(pair for pair in row if pair[0] not in volatile)
            for row in tables.get("clients", ())
        )
        tables["updates"] = tuple(
            row for row in tables.get("updates", ()) if dict(row)["status"] != "rejected"
        )
        files = {k: v for k, v in snapshot.files.items() if not k.startswith("uploads/")}
        return Snapshot(tables, files, snapshot.last_event)

    def staging(self) -> dict[str, int]:
        """Files under ``uploads/`` and ``blobs/tmp/``."""
        files = self.arena.snapshot().files
        return {k: v for k, v in files.items() if k.startswith(("uploads/", "blobs/tmp/"))}

    # ------------------------------------------------------------------ calls

    def _resolves(self, ref: str) -> bool:
        try:
            self.arena.store.resolve_model(ref)
        except (FlctlError, ValueError, OverflowError):
            return False
        return True

    def _has_session(self, client_id: str) -> bool:
        registry = self.arena.coordinator._registry
        assert registry is not None
        return registry.get(client_id) is not None

    def send(self, call: Call) -> Outcome | None:
        """Send one call (None: an Admin change, not sent) and keep c1's session alive."""
        target = call.target
        if is_admin_change(
            target,
            call.messages[0],
            open_round=self.arena.server_round,
            resolves=self._resolves,
            has_session=self._has_session,
        ):
            self.tally.skipped += 1
            return None
        outcome = self.arena.run(self._send(call), timeout=self._deadline + 30)
        self.tally.statuses[(target.method, outcome.status.name)] += 1
        self.tally.origins[call.origin] += 1
        # a request that does not parse is refused INVALID_ARGUMENT ("malformed <Type>"), so
        # UNKNOWN, like flctl's own INTERNAL, means an exception escaped a handler. gRPC core's
        # "Internal error from Core" is the transport's: a client stream still sending when the
        # server has answered and reset it (seen now and then on refused Upload streams)
        if outcome.status is grpc.StatusCode.UNKNOWN or (
            outcome.status is grpc.StatusCode.INTERNAL and outcome.details != GRPC_CORE_INTERNAL
        ):
            outcome.problem = f"{target.method} ({call.origin}): {outcome.details}"
        if outcome.status is grpc.StatusCode.DEADLINE_EXCEEDED and not target.follows:
            outcome.problem = f"{target.method} ({call.origin}) hung"
        if outcome.problem is not None:
            self.tally.unexpected.append(outcome.problem)
        if target.service == "Coordinator":
            self._keep_session()
            self._reopen_task()
        return outcome

    async def _send(self, call: Call) -> Outcome:
        target = call.target
        channel = self._channels[target.service]
        metadata = (
            (("authorization", f"Bearer {self._token}"),) if target.service == "Coordinator" else ()
        )
        timeout = self._stream_deadline if target.follows else self._deadline
        started = time.perf_counter()
        try:
            if target.kind == "unary":
                method = channel.unary_unary(target.path)
                reply = await method(call.messages[0], metadata=metadata, timeout=timeout)
                if target.method == "Join":  # a mutated Join can be a valid one: a new session
                    joined = pb.JoinReply.FromString(reply)
                    self._token, self._session = joined.session_token, joined.session_id
                elif target.method == "RenewToken":  # the session's new token
                    self._token = pb.RenewTokenReply.FromString(reply).session_token
            elif target.kind == "server-stream":
                stream = channel.unary_stream(target.path)
                async for _ in stream(call.messages[0], metadata=metadata, timeout=timeout):
                    pass
            else:
                upload = channel.stream_unary(target.path)

                async def messages() -> AsyncIterator[bytes]:
                    for message in call.messages:
                        yield message

                await upload(messages(), metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "", time.perf_counter() - started)
        return Outcome(grpc.StatusCode.OK, "", time.perf_counter() - started)

    def _keep_session(self) -> None:
        """Join again when a call ended c1's session (a second Tasks stream ends it on close)."""
        registry = self.arena.coordinator._registry
        assert registry is not None
        session = registry.get("c1")
        if session is not None and session.session_id == self._session:
            return
        self.tally.rejoins += 1

        async def join() -> pb.JoinReply:
            method = self._channels["Coordinator"].unary_unary(
                "/flctl.v1.Coordinator/Join",
                request_serializer=pb.JoinRequest.SerializeToString,
                response_deserializer=pb.JoinReply.FromString,
            )
            reply: pb.JoinReply = await method(self.arena.join_request(), timeout=10)
            return reply

        joined = self.arena.run(join())
        self._token, self._session = joined.session_token, joined.session_id

    def _reopen_task(self) -> None:
        """Forget that c1's update for its task was refused, so the next upload meets every check.

        An update refused as malformed is final for its task: any later upload for it is
        answered at once (accepted=false), before its header's bounds or its bytes are read.
        Left so, the first malformed upload to reach the bytes would decide what every later
        one gets. (The suite's ``_reopen_refused_tasks`` fixture does this between tests.)
        """
        engine = self.arena.coordinator._engine
        if engine is not None and engine.open is not None:
            engine.open.refused.pop("c1", None)

    # ------------------------------------------------------------------ health

    def close(self) -> None:
        """Close the fuzzer's channels."""

        async def close() -> None:
            for channel in self._channels.values():
                await channel.close()

        self.arena.run(close())

    def healthy(self) -> list[str]:
        """What a normal client and admin get now (empty: all as expected)."""
        problems: list[str] = []

        async def check() -> None:
            status = await self.arena.admin().status()
            if status.head_version < 1:
                problems.append(f"Status: head version {status.head_version}")
            api = self.arena.client("c3")
            joined = await api.join(self.arena.join_request())
            if joined.client_id != "c3":
                problems.append(f"Join: client id {joined.client_id!r}")

        try:
            self.arena.run(check(), timeout=30)
        except (FlctlError, TimeoutError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        return problems

    def end_round(self) -> None:
        """Cancel the open round: the engine then discards every upload begun for it."""

        async def cancel() -> None:
            await self.arena.admin().cancel_round([self.arena.server_round], reason="fuzz done")
            await self.arena.until(lambda: self.arena.coordinator._engine.open is None)  # type: ignore[union-attr]

        self.arena.run(cancel())
