"""A swarm of lightweight clients: many torch-free clients as asyncio tasks in one process.

Scale tests and ``bench/fanout.py`` need a hundred clients on a machine that cannot hold a
hundred torch processes. Each :class:`SwarmClient` speaks the real protocol over its own
mutual-TLS channel, with its own certificate, exactly as :class:`~flctl.client.Runner` does:
Join (protocol version, task fingerprint, codecs), heartbeats at the interval the coordinator
gives (and at once when its state changes), the Tasks stream, Download (digest checked), then
BeginUpload and Upload. Downloads accept the codecs negotiated at Join, as the runner's do;
updates travel uncompressed (codec ``none``). Only training is simulated: the model's float
bytes get a small seeded perturbation (numpy), so an update costs little and the coordinator's
own cost per client is what a run measures.

```
python -m flctl.client._swarm --project DIR --spec MODEL.safetensors --clients 100 --rounds 3 --json
```

``--spec`` is any safetensors file of the task's model (``flctl models export 1 -o FILE``):
only its header is read, for the fingerprint sent at Join. Client ``i`` uses the certificate
``c<i>`` (``flctl certs gen --clients N``). The command prints a per-client summary (join time,
bytes, each round's download, train and upload times, errors) and exits 1 if any client had an
error. Every exception a client meets is an error: it is recorded, counted and reported, and
that client stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import statistics
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from flctl.core import load_config
from flctl.core.errors import FlctlError, IntegrityError, InvalidInputError, TaskError
from flctl.core.work import Task
from flctl.security import load_credentials
from flctl.tensors import TensorSpec, fingerprint, read_spec, read_spec_bytes
from flctl.transport import CODEC_NONE, CODECS, COMPRESSING_CODECS
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    CoordinatorClient,
    pb,
    secure_channel,
    to_value_map,
)

__all__ = [
    "ClientReport",
    "RoundTiming",
    "SwarmClient",
    "SwarmOptions",
    "SwarmReport",
    "load_spec",
    "main",
    "perturb",
    "run_swarm",
]

#: Standard deviation of the simulated training step, relative to nothing: added as is.
_NOISE = 1e-3
_FLOAT_DTYPES = {"F32": "<f4", "F64": "<f8"}


@dataclass(frozen=True)
class SwarmOptions:
    """What a swarm connects to and how long it runs.

    Attributes:
        server: The coordinator's ``HOST:PORT``.
        certs_dir: The project's certificate folder (CA, ``c1`` .. ``cN``).
        client_ids: One client per identity, each with its own certificate and channel.
        spec: The task's model (names, dtypes, shapes) for the fingerprint.
        rounds: Each client leaves after serving this many tasks.
        timeout_s: A client still running after this long is stopped with an error.
        seed: Base of each client's perturbation seed (``seed`` + its index).
        connect_timeout_s: How long a Join may take.
    """

    server: str
    certs_dir: Path
    client_ids: tuple[str, ...]
    spec: Mapping[str, TensorSpec]
    rounds: int = 1
    timeout_s: float = 120.0
    seed: int = 0
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, not {self.rounds!r}")
        if not self.client_ids:
            raise ValueError("a swarm needs at least one client id")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {self.timeout_s!r}")


@dataclass
class RoundTiming:
    """One task a swarm client served (seconds are wall time in the swarm's process).

    Attributes:
        server_round: The task's round.
        received_s: When the task arrived, since the swarm started.
        download_s: Download, digest checked.
        train_s: The simulated training step (the client's own work).
        upload_s: BeginUpload and Upload, to the coordinator's answer.
        done_s: When the coordinator answered, since the swarm started.
        bytes_down, bytes_up: Payload bytes moved.
        accepted: The coordinator's answer.
        reason: Why it refused, if it did.
    """

    server_round: int
    received_s: float = 0.0
    download_s: float = 0.0
    train_s: float = 0.0
    upload_s: float = 0.0
    done_s: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    accepted: bool = False
    reason: str = ""


@dataclass
class ClientReport:
    """What one swarm client did, and every error it met."""

    client_id: str
    join_s: float = 0.0
    rounds: list[RoundTiming] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_down(self) -> int:
        """Payload bytes downloaded over all rounds."""
        return sum(r.bytes_down for r in self.rounds)

    @property
    def bytes_up(self) -> int:
        """Payload bytes uploaded over all rounds."""
        return sum(r.bytes_up for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """As plain JSON-ready values."""
        return {
            "client_id": self.client_id,
            "join_s": round(self.join_s, 4),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "rounds": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()}
                for r in self.rounds
            ],
            "errors": list(self.errors),
        }


@dataclass
class SwarmReport:
    """All clients' reports, and the swarm's wall time."""

    clients: list[ClientReport]
    rounds: int
    wall_s: float

    @property
    def error_count(self) -> int:
        """Errors over all clients."""
        return sum(len(c.errors) for c in self.clients)

    def per_round(self) -> list[dict[str, Any]]:
        """Per round: how many clients were accepted, and the slowest and median step times."""
        out = []
        by_round: dict[int, list[RoundTiming]] = {}
        for client in self.clients:
            for timing in client.rounds:
                by_round.setdefault(timing.server_round, []).append(timing)
        for server_round in sorted(by_round):
            timings = by_round[server_round]
            row: dict[str, Any] = {
                "server_round": server_round,
                "clients": len(timings),
                "accepted": sum(t.accepted for t in timings),
                "first_received_s": round(min(t.received_s for t in timings), 4),
                "last_done_s": round(max(t.done_s for t in timings), 4),
            }
            for step in ("download_s", "train_s", "upload_s"):
                values = [getattr(t, step) for t in timings]
                row[f"max_{step}"] = round(max(values), 4)
                row[f"median_{step}"] = round(statistics.median(values), 4)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document ``python -m flctl.client._swarm --json`` prints."""
        return {
            "clients": len(self.clients),
            "rounds": self.rounds,
            "errors": self.error_count,
            "wall_s": round(self.wall_s, 3),
            "completed": sum(
                1
                for c in self.clients
                if not c.errors and sum(r.accepted for r in c.rounds) == self.rounds
            ),
            "bytes_down": sum(c.bytes_down for c in self.clients),
            "bytes_up": sum(c.bytes_up for c in self.clients),
            "per_round": self.per_round(),
            "per_client": [c.to_dict() for c in self.clients],
        }


def perturb(model: bytes | bytearray, rng: np.random.Generator, scale: float = _NOISE) -> bytearray:
    """Simulate a training step: add seeded noise to the float32 and float64 tensors of a model.

    The safetensors header is kept byte for byte (same names, dtypes, shapes and offsets), so
    the result is a valid update of the same model; other tensors are copied unchanged.

    Raises:
        InvalidInputError: ``model`` is not a well-formed safetensors file.
    """
    if len(model) < 8:
        raise InvalidInputError("not a safetensors file: shorter than its 8-byte prefix")
    start = 8 + int.from_bytes(model[:8], "little")
    specs = read_spec_bytes(bytes(model[:start]), data_size=len(model) - start)
    out = bytearray(model)
    for spec in specs.values():
        dtype = _FLOAT_DTYPES.get(spec.dtype)
        if dtype is None or spec.numel == 0:
            continue
        values = np.frombuffer(model, dtype=dtype, count=spec.numel, offset=start + spec.begin)
        noise = rng.standard_normal(spec.numel, dtype=np.float64 if dtype == "<f8" else np.float32)
        noise *= scale
        out[start + spec.begin : start + spec.end] = (values + noise).astype(dtype).tobytes()
    return out


class _Buffer:
    """A download sink that keeps the bytes and hashes them as they arrive."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.hash = hashlib.sha256()

    def write(self, data: bytes | memoryview, /) -> int:
        self.hash.update(data)
        self.data += data
        return len(data)


class SwarmClient:
    """One lightweight client: the real protocol, a simulated training step.

    Args:
        client_id: Its identity (``<client_id>.crt`` and ``.key`` in the certificate folder).
        options: The swarm's settings.
        index: Its position in the swarm (seeds its perturbation).
        started: The swarm's start (``time.perf_counter()``), for the report's timestamps.
    """

    def __init__(
        self, client_id: str, options: SwarmOptions, *, index: int, started: float
    ) -> None:
        self.report = ClientReport(client_id)
        self._options = options
        self._started = started
        self._rng = np.random.default_rng(options.seed + index)
        self._state = ("idle", 0)
        self._dirty = asyncio.Event()
        specs = options.spec
        self._fingerprint = fingerprint(specs)
        self._spec_json = json.dumps({n: [s.dtype, list(s.shape)] for n, s in specs.items()})

    async def run(self) -> ClientReport:
        """Join, serve ``rounds`` tasks, leave; every error is recorded in the report."""
        try:
            async with asyncio.timeout(self._options.timeout_s):
                await self._session()
        except TimeoutError:
            done = len(self.report.rounds)
            self.report.errors.append(
                f"TimeoutError: still running after {self._options.timeout_s:g} s "
                f"({done} of {self._options.rounds} tasks served)"
            )
        except FlctlError as exc:
            self.report.errors.append(f"{type(exc).__name__}: {exc.message}")
        except Exception as exc:  # the client loop reports every failure, never hides one
            self.report.errors.append(f"{type(exc).__name__}: {exc}")
        return self.report

    def _now(self) -> float:
        return time.perf_counter() - self._started

    def _set_state(self, state: str, server_round: int) -> None:
        self._state = (state, server_round)
        self._dirty.set()

    async def _session(self) -> None:
        cert, key, ca = await asyncio.to_thread(
            load_credentials, self._options.certs_dir, self.report.client_id
        )
        api = CoordinatorClient(
            secure_channel(self._options.server, cert_pem=cert, key_pem=key, ca_pem=ca)
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            request = pb.JoinRequest(
                protocol_version=PROTOCOL_VERSION,
                task_fingerprint=self._fingerprint,
                client_version="flctl-swarm",
                codecs=list(CODECS),  # as the runner: downloads may come compressed
            )
            to_value_map(request.properties, {"model_spec": self._spec_json})
            begin = time.perf_counter()
            reply = await api.join(request, timeout=self._options.connect_timeout_s)
            self.report.join_s = time.perf_counter() - begin
            serving = asyncio.create_task(self._serve(api, reply))
            heartbeats = asyncio.create_task(
                self._heartbeats(api, max(0.1, reply.heartbeat_interval_s))
            )
            tasks = [serving, heartbeats]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            # serving ends when the rounds are done (or raises); heartbeats end only by raising
            (serving if serving in done else heartbeats).result()
        finally:
            for task in tasks:
                task.cancel()
            # what a cancelled task raised on its way out would only repeat the first error
            await asyncio.gather(*tasks, return_exceptions=True)
            await api.close()

    async def _heartbeats(self, api: CoordinatorClient, interval: float) -> None:
        while True:
            self._dirty.clear()
            state, server_round = self._state
            answer = await api.heartbeat(
                pb.HeartbeatRequest(state=state, server_round=server_round)
            )
            if answer.command == "rejoin":
                raise TaskError("the coordinator no longer knows this session (asked to rejoin)")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._dirty.wait()

    async def _serve(self, api: CoordinatorClient, reply: pb.JoinReply) -> None:
        # the stream is an async generator: closing it cancels the call at once
        stream = cast(AsyncGenerator[Task, None], api.tasks())
        async with contextlib.aclosing(stream):
            async for task in stream:
                if task.kind != "fit":
                    raise TaskError(f"the swarm cannot run {task.kind!r} tasks (fit only)")
                await self._fit(api, reply, task)
                if len(self.report.rounds) >= self._options.rounds:
                    return
        raise TaskError(
            f"the coordinator ended the task stream after {len(self.report.rounds)} of "
            f"{self._options.rounds} tasks"
        )

    async def _fit(self, api: CoordinatorClient, reply: pb.JoinReply, task: Task) -> None:
        timing = RoundTiming(int(task.server_round), received_s=self._now())
        self.report.rounds.append(timing)
        self._set_state("downloading", timing.server_round)
        begin = time.perf_counter()
        buffer = _Buffer()
        accepted = [c for c in reply.codecs if c in COMPRESSING_CODECS]
        await api.download(task.model_digest, buffer, codecs=accepted)
        if buffer.hash.hexdigest() != task.model_digest:
            raise IntegrityError(f"downloaded model {task.model_digest[:12]} fails its digest")
        model = buffer.data
        timing.bytes_down = len(model)
        timing.download_s = time.perf_counter() - begin

        self._set_state("training", timing.server_round)
        begin = time.perf_counter()
        update = await asyncio.to_thread(perturb, model, self._rng)
        timing.train_s = time.perf_counter() - begin

        self._set_state("uploading", timing.server_round)
        begin = time.perf_counter()
        answer = await self._upload(api, reply, task, update)
        timing.upload_s = time.perf_counter() - begin
        timing.done_s = self._now()
        timing.accepted = bool(answer.accepted)
        timing.reason = answer.reason
        self._set_state("idle", 0)
        if not answer.accepted:
            raise TaskError(f"round {timing.server_round}: update refused: {answer.reason}")
        timing.bytes_up = len(update)

    async def _upload(
        self, api: CoordinatorClient, reply: pb.JoinReply, task: Task, update: bytearray
    ) -> pb.UploadReply:
        digest = await asyncio.to_thread(lambda: hashlib.sha256(update).hexdigest())
        header = pb.UploadHeader(
            server_round=task.server_round,
            task_id=task.task_id,
            num_examples=1,
            digest=digest,
            size=len(update),
            codec=CODEC_NONE,
        )
        opened = await api.begin_upload(header)
        if not opened.accepted:
            return opened
        offset = int(opened.committed_offset)
        if offset > len(update):
            raise IntegrityError(
                f"the coordinator holds {offset} bytes of a {len(update)}-byte update"
            )
        resumed = pb.UploadHeader()
        resumed.CopyFrom(header)
        resumed.upload_id = opened.upload_id
        resumed.offset = offset
        chunk = int(reply.limits.max_chunk_bytes) or (1 << 20)
        return await api.upload(resumed, _chunks(memoryview(update)[offset:], chunk))


async def _chunks(data: memoryview, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield bytes(data[start : start + size])


async def run_swarm(options: SwarmOptions) -> SwarmReport:
    """Run one :class:`SwarmClient` per identity, all at once; wait for every one to end."""
    started = time.perf_counter()
    clients = [
        SwarmClient(cid, options, index=i, started=started)
        for i, cid in enumerate(options.client_ids)
    ]
    reports = await asyncio.gather(*(c.run() for c in clients))
    return SwarmReport(list(reports), options.rounds, time.perf_counter() - started)


def load_spec(path: Path) -> dict[str, TensorSpec]:
    """The model spec in a safetensors file's header (the tensors are not read).

    Raises:
        InvalidInputError: The file is missing or not a safetensors file.
    """
    try:
        return read_spec(path)
    except OSError as exc:
        raise InvalidInputError(f"cannot read model spec {str(path)!r}: {exc}") from None


def _server_of(project: Path) -> str:
    """The running coordinator's address from the project's serve.json."""
    config = load_config(project / "flctl.toml")
    serve_file = config.state_path / "serve.json"
    try:
        return str(json.loads(serve_file.read_text())["address"])
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(
            f"no running coordinator found in {str(serve_file)!r} ({exc}); pass --server"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flctl.client._swarm",
        description="Run N lightweight clients (real gRPC and mutual TLS, no torch).",
    )
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder")
    parser.add_argument("--server", help="HOST:PORT (default: the project's serve.json)")
    parser.add_argument("--spec", type=Path, required=True, help="a safetensors file of the model")
    parser.add_argument("--clients", type=int, default=10, help="clients c<first>..")
    parser.add_argument("--first", type=int, default=1, help="index of the first client id")
    parser.add_argument("--prefix", default="c", help="client id prefix")
    parser.add_argument("--rounds", type=int, default=1, help="tasks each client serves")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command entry; returns the exit status (1 if any client had an error)."""
    args = _parser().parse_args(argv)
    try:
        project = args.project.resolve()
        config = load_config(project / "flctl.toml")
        options = SwarmOptions(
            server=args.server or _server_of(project),
            certs_dir=config.certs_path,
            client_ids=tuple(
                f"{args.prefix}{i}" for i in range(args.first, args.first + args.clients)
            ),
            spec=load_spec(args.spec),
            rounds=args.rounds,
            timeout_s=args.timeout,
            seed=args.seed,
        )
    except (FlctlError, ValueError) as exc:
        message = exc.message if isinstance(exc, FlctlError) else str(exc)
        print(f"swarm: {message}", file=sys.stderr)
        return 2
    report = asyncio.run(run_swarm(options))
    document = report.to_dict()
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(
            f"{document['clients']} clients, {report.rounds} rounds, {document['errors']} errors, "
            f"{document['completed']} completed, {document['wall_s']} s"
        )
        for row in document["per_round"]:
            print(
                f"  round {row['server_round']}: {row['accepted']}/{row['clients']} accepted, "
                f"max download {row['max_download_s']} s, max train {row['max_train_s']} s, "
                f"max upload {row['max_upload_s']} s"
            )
        for client in report.clients:
            for error in client.errors:
                print(f"  {client.client_id}: {error}", file=sys.stderr)
    return 1 if report.error_count else 0


if __name__ == "__main__":
    raise SystemExit(main())
