"""``flctl simulate``: the project's task with N virtual clients, through the deployed engine.

A simulation starts the project's coordinator in-process (:class:`~flctl.coordinator.Coordinator`
with ``in_process``: the same round engine, strategy, privacy wrapper, validation gate, store
and event log as ``flctl serve``; no listener), joins N virtual clients ``sim-00000`` ...
(client i holds ``partition_id`` i of ``num_partitions`` N), queues the rounds and serves each
task a client is sent on a backend's workers (:mod:`._local`, or Ray: :mod:`._ray`). Selection,
deadlines, over-selection, quorum, retries and the gate work as in deployment: the engine does
not know its clients are virtual. The rounds it queues record ``simulation`` in their config
(round status, the store), and their ``round.queued`` events name ``simulate`` as the admin.

With ``[secagg] enabled`` each virtual client runs its part of the round's secure aggregation
in the dispatcher, as a deployed client does over the network (``flctl.client``'s SecAgg
stages, through the in-process transport): it exchanges keys, its worker trains, the
dispatcher masks the update and hands the masked input over, and the client answers the
unmasking. The coordinator sees only masked inputs and their sum, as in deployment; the
plaintext update exists in the simulation's own update folder until it is masked.

Heterogeneity (``[simulation]``): a selected client drops out with ``dropout_rate`` (its task
fails: the engine stops waiting for it, as for a deployed client whose training fails); a
``straggler_fraction`` of the others upload ``straggler_delay_s`` late. Who drops out or straggles
follows from the seed, the round and the client, as does the selection: a run repeats.

The run is recorded in ``<state>/simulation/run.json`` (its clients, selection and rounds); an
interrupted simulation (Ctrl-C) ends its open round as a stopped coordinator does, and
``--resume`` starts the coordinator again with the same clients and runs the rounds the run
still owes, from the head (the last committed round).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flctl.client import SecAggParticipant, exchange_keys, finish_unmasking
from flctl.coordinator import Coordinator
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.errors import ConfigError, ConflictError, FlctlError, NotFoundError, SecAggError
from flctl.core.events import Event
from flctl.core.work import SecAggAnswer, Task, UploadHeader
from flctl.security import SECAGG_TASK_KEY, SecAggTask
from flctl.store import open_store, require_state
from flctl.tensors import MASKED_ENCODING, sha256_file

from ._worker import WorkerSetup

__all__ = ["RoundOutcome", "SimulationOptions", "SimulationReport", "simulate"]

RUN_FILE = "run.json"
_TERMINAL = frozenset({"committed", "rejected", "failed", "cancelled"})
#: Why a round the simulation was interrupted in ended (run.json keeps their ids).
INTERRUPTED = "simulation interrupted"


class Backend(Protocol):
    """Where virtual clients' jobs run (:class:`LocalBackend`, :class:`RayBackend`)."""

    name: str
    workers: int

    async def start(self) -> None: ...
    async def run(self, job: dict[str, Any]) -> dict[str, Any]: ...
    async def stats(self) -> list[dict[str, Any]]: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class SimulationOptions:
    """What ``flctl simulate`` was asked (0 and "" mean: as flctl.toml says)."""

    clients: int = 0
    rounds: int = 0
    per_round: int = 0
    workers: int = 0
    backend: str = ""
    ray_address: str = ""
    resume: bool = False


@dataclass
class RoundOutcome:
    """How one round of the simulation went."""

    id: int
    status: str
    reason: str
    seconds: float
    num_clients: int
    metrics: dict[str, float]
    #: seconds the workers spent in fit and evaluate jobs for this round, summed
    job_seconds: float = 0.0
    jobs: int = 0
    dropped: int = 0
    stragglers: int = 0

    def overhead_ms_per_client(self, workers: int) -> float | None:
        """The engine's time per client: round wall minus job time per worker, per job."""
        if not self.jobs:
            return None
        return max(0.0, self.seconds - self.job_seconds / max(1, workers)) / self.jobs * 1000.0


@dataclass
class SimulationReport:
    """What a simulation did (``--json`` prints it)."""

    clients: int
    per_round: int
    backend: str
    workers: int
    startup_s: float = 0.0
    wall_s: float = 0.0
    rounds: list[RoundOutcome] = field(default_factory=list)
    head_version: int = 0
    head_digest: str = ""
    peak_rss: dict[str, int] = field(default_factory=dict)
    resumed: bool = False
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """As one JSON document."""
        doc = dataclasses.asdict(self)
        for outcome, entry in zip(self.rounds, doc["rounds"], strict=True):
            per_client = outcome.overhead_ms_per_client(self.workers)
            entry["overhead_ms_per_client"] = None if per_client is None else round(per_client, 3)
        return doc


def _client_ids(count: int) -> list[str]:
    width = max(5, len(str(count - 1)))
    return [f"sim-{i:0{width}d}" for i in range(count)]


def _run_file(config: Config) -> Path:
    return config.state_path / "simulation" / RUN_FILE


def _read_run(config: Config) -> dict[str, Any]:
    path = _run_file(config)
    try:
        run: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(
            f"no simulation to resume in {config.state_path}",
            hint="run `flctl simulate --clients N --rounds R` first",
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}): start a new simulation") from None
    return run


def _write_run(config: Config, run: dict[str, Any]) -> None:
    path = _run_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(run, indent=2))
    os.replace(temp, path)


def _simulated_config(config: Config, clients: int, per_round: int) -> Config:
    """The project's config with the simulation's population and selection."""
    rounds = config.rounds
    if per_round:
        if per_round > clients:
            raise ConfigError(f"--per-round {per_round} is more than --clients {clients}")
        if per_round < rounds.min_clients:
            raise ConfigError(
                f"--per-round {per_round} is below rounds.min_clients ({rounds.min_clients}): "
                "no round could reach its quorum"
            )
        rounds = dataclasses.replace(rounds, clients_per_round=per_round, fraction_per_round=0.0)
    if rounds.min_clients > clients:
        raise ConfigError(
            f"--clients {clients} is below rounds.min_clients ({rounds.min_clients}): "
            "no round could reach its quorum"
        )
    data = dataclasses.replace(config.data, num_partitions=clients)
    return dataclasses.replace(config, rounds=rounds, data=data)


def _workers(config: Config, options: SimulationOptions) -> int:
    if options.workers:
        return options.workers
    if config.simulation.workers:
        return config.simulation.workers
    # one per client_cpus cores: a job whose fits dominate uses every core (docs/benchmarks.md
    # has runs where fewer workers did as well, with less memory)
    cores = os.cpu_count() or 1
    return max(1, int(cores / max(config.simulation.client_cpus, 0.01)))


def _make_backend(
    config: Config, name: str, workers: int, ray_address: str, setup: WorkerSetup
) -> Backend:
    log_dir = config.state_path / "simulation" / "logs"
    if name == "local":
        from ._local import LocalBackend

        return LocalBackend(setup, workers, log_dir)
    if name == "ray":
        from ._ray import RayBackend

        return RayBackend(
            setup,
            workers,
            address=ray_address,
            client_cpus=config.simulation.client_cpus,
            client_gpus=config.simulation.client_gpus,
        )
    raise ConfigError(f"unknown simulation backend {name!r}", hint="use 'local' or 'ray'")


class _Dispatcher:
    """Serves the tasks the engine sends virtual clients, on the backend's workers."""

    def __init__(self, config: Config, coordinator: Coordinator, backend: Backend) -> None:
        assert coordinator.local is not None
        self._local = coordinator.local
        self._backend = backend
        self._config = config
        self._sim = config.simulation
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._partition: dict[str, int] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        #: round -> [job seconds, jobs, dropped, stragglers]
        self.per_round: dict[int, list[float]] = {}
        self.failures: list[str] = []

    def connect(self, client_ids: list[str]) -> None:
        self._local.connect_all(client_ids, self._ready.put_nowait)
        self._partition = {client_id: index for index, client_id in enumerate(client_ids)}

    async def run(self) -> None:
        while True:
            client_id = await self._ready.get()
            session = self._local.session(client_id)
            if session is None:
                continue
            while not session.queue.empty():
                task = session.queue.get_nowait()
                if task is None:
                    continue
                job = asyncio.create_task(self._serve(client_id, session, task))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        for job in list(self._jobs):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job

    def _count(self, server_round: int, slot: int, amount: float = 1.0) -> None:
        self.per_round.setdefault(server_round, [0.0, 0.0, 0.0, 0.0])[slot] += amount

    async def _serve(self, client_id: str, session: Any, task: Task) -> None:
        rng = random.Random(f"{self._config.project.seed}/{task.server_round}/{client_id}")
        job = {
            "op": task.kind,
            "job": hash((client_id, task.task_id)) & 0xFFFFFFFF,
            "client_id": client_id,
            "partition_id": self._partition[client_id],
            "model": str(self._local.model_path(task.model_digest)),
            "model_digest": task.model_digest,
            # the round's SecAgg setup is the dispatcher's, not the task's fit's
            "config": {k: v for k, v in task.config.items() if k != SECAGG_TASK_KEY},
        }
        if task.kind == "evaluate":
            answer = await self._backend.run(job)
            self._count(task.server_round, 0, float(answer.get("seconds", 0.0)))
            self._count(task.server_round, 1)
            with contextlib.suppress(FlctlError):  # refused numbers fail that evaluation only
                if answer["ok"]:
                    self._local.evaluation(
                        session,
                        task,
                        loss=float(answer["loss"]),
                        num_examples=int(answer["num_examples"]),
                        metrics=answer["metrics"],
                    )
                else:
                    self._local.evaluation(session, task, failure=str(answer["reason"]))
            return
        if rng.random() < self._sim.dropout_rate:
            self._count(task.server_round, 2)
            self._local.task_failed(
                session, task.server_round, "dropped out (simulation.dropout_rate)"
            )
            return
        straggles = rng.random() < self._sim.straggler_fraction
        entry = task.config.get(SECAGG_TASK_KEY)
        if entry is not None:
            await self._serve_secure(session, task, job, str(entry), straggles)
            return
        answer = await self._backend.run(job)
        self._count(task.server_round, 0, float(answer.get("seconds", 0.0)))
        self._count(task.server_round, 1)
        if not answer["ok"]:
            self._local.task_failed(session, task.server_round, str(answer["reason"]))
            return
        path = Path(answer["path"])
        try:
            if straggles:
                self._count(task.server_round, 3)
                await asyncio.sleep(self._sim.straggler_delay_s)
            header = UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                digest=str(answer["digest"]),
                size=int(answer["size"]),
                num_examples=int(answer["num_examples"]),
                metrics=answer["metrics"],
                codec="none",
                encoding=str(answer["encoding"]),
                dtype=str(answer["dtype"]),
                base_digest=task.model_digest if answer["encoding"] == "delta" else "",
            )
            try:
                await self._local.upload(session, header, path)
            except FlctlError as exc:  # refused as malformed: the task is over, as deployed
                self._local.task_failed(
                    session,
                    task.server_round,
                    f"the coordinator refused the update: {exc.message}",
                )
        finally:
            path.unlink(missing_ok=True)

    async def _serve_secure(
        self, session: Any, task: Task, job: dict[str, Any], entry: str, straggles: bool
    ) -> None:
        """A fit task of a round with secure aggregation, as a deployed client runs it."""
        server_round = task.server_round

        async def send(stage: str, payload: bytes) -> SecAggAnswer:
            return await self._local.secagg(session, task, stage, payload)

        def out(reason: str) -> None:
            self._local.task_failed(session, server_round, reason)

        try:
            participant = SecAggParticipant(SecAggTask.from_json(entry), job["client_id"])
            why = await exchange_keys(participant, send)
            if why is not None:
                out(why)
                return
            answer = await self._backend.run(job)
            self._count(server_round, 0, float(answer.get("seconds", 0.0)))
            self._count(server_round, 1)
            if not answer["ok"]:
                out(str(answer["reason"]))
                return
            path = Path(answer["path"])
            masked = path.with_name(path.name + ".masked")
            try:
                await asyncio.to_thread(
                    participant.write_masked,
                    Path(job["model"]),
                    path,
                    int(answer["num_examples"]),
                    masked,
                )
            finally:
                path.unlink(missing_ok=True)  # the plaintext update goes no further
            try:
                if straggles:
                    self._count(server_round, 3)
                    await asyncio.sleep(self._sim.straggler_delay_s)
                header = UploadHeader(
                    server_round=server_round,
                    task_id=task.task_id,
                    digest=await asyncio.to_thread(sha256_file, masked),
                    size=masked.stat().st_size,
                    num_examples=int(answer["num_examples"]),
                    metrics=answer["metrics"],
                    codec="none",
                    encoding=MASKED_ENCODING,
                )
                reply = await self._local.upload(session, header, masked)
            finally:
                masked.unlink(missing_ok=True)
            if not reply.accepted:
                return  # late or duplicate, as for any update
            why = await finish_unmasking(participant, send)
            if why is not None:
                out(why)
        except FlctlError as exc:  # refused, or the coordinator broke the protocol
            reason = exc.message
            if isinstance(exc, SecAggError):
                reason = f"secure aggregation: {reason}"
            out(reason)


async def simulate(
    config: Config,
    options: SimulationOptions,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> SimulationReport:
    """Run a simulation (see the module docstring); its report.

    ``on_event`` hears ("started", ...), ("round", outcome as a dict) as each round ends and
    ("progress", ...) as updates arrive.

    Raises:
        FlctlError: Bad options, a task that does not load, no run to resume, or rounds of an
            interrupted simulation still queued (resume them first).
    """
    started = time.perf_counter()
    emit = on_event or (lambda kind, details: None)
    run: dict[str, Any]
    if options.resume:
        run = _read_run(config)
        clients, per_round = int(run["clients"]), int(run["per_round"])
    else:
        if options.clients < 1 or options.rounds < 1:
            missing = "--clients" if options.clients < 1 else "--rounds"
            raise ConfigError(
                f"{missing} must be at least 1",
                hint="flctl simulate --clients N --rounds R (or --resume to finish a run)",
            )
        clients, per_round = options.clients, options.per_round
        run = {"clients": clients, "per_round": per_round, "rounds": options.rounds, "ids": []}
    sim_config = _simulated_config(config, clients, per_round)
    if not options.resume:
        _refuse_leftover_rounds(config)
    backend_name = options.backend or config.simulation.backend
    workers = _workers(config, options)
    setup = WorkerSetup.from_config(config, clients)
    backend = _make_backend(
        config, backend_name, workers, options.ray_address or config.simulation.ray_address, setup
    )
    report = SimulationReport(
        clients=clients,
        per_round=per_round,
        backend=backend.name,
        workers=workers,
        resumed=options.resume,
    )
    coordinator = Coordinator(sim_config, in_process=True)
    progress: dict[int, int] = {}

    def listen(event: Event) -> None:
        if event.type == ev.UPDATE_ACCEPTED:
            progress[event.server_round] = progress.get(event.server_round, 0) + 1
            emit(
                "progress",
                {"server_round": event.server_round, "updates": progress[event.server_round]},
            )
        elif event.type == ev.ROUND_STARTED:
            emit("round_started", {"server_round": event.server_round, **event.data})

    coordinator.subscribe(listen)
    starting = asyncio.create_task(backend.start())
    dispatcher: _Dispatcher | None = None
    serving: asyncio.Task[None] | None = None
    ids: list[int] = []
    try:
        try:
            await coordinator.start()
        finally:
            if coordinator.store is None:  # refused before it opened anything
                starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
        await starting
        store = coordinator.store
        assert store is not None
        report.startup_s = round(time.perf_counter() - started, 3)
        emit(
            "started",
            {
                "clients": clients,
                "workers": workers,
                "backend": backend.name,
                "startup_s": report.startup_s,
            },
        )
        dispatcher = _Dispatcher(sim_config, coordinator, backend)
        dispatcher.connect(_client_ids(clients))
        serving = asyncio.create_task(dispatcher.run())
        if options.resume:
            interrupted = set(run.get("interrupted", []))
            done = 0
            for round_id in run["ids"]:
                record = store.get_round(round_id)
                if record.status in _TERMINAL and round_id not in interrupted:
                    done += 1
            pending = [i for i in run["ids"] if store.get_round(i).status not in _TERMINAL]
            owed = int(run["rounds"]) - done - len(pending)
            ids = list(pending)
            if owed > 0:
                ids += coordinator.queue_rounds(
                    owed, admin="simulate", simulation=_marker(run, backend)
                )
            # the rounds the interrupt ended do not count: the new ones take their place
            kept = [i for i in run["ids"] if i not in interrupted]
            run["ids"] = kept + [i for i in ids if i not in kept]
            run["interrupted"] = []
        else:
            ids = coordinator.queue_rounds(
                options.rounds, admin="simulate", simulation=_marker(run, backend)
            )
            run["ids"] = ids
        _write_run(config, run)
        reported: set[int] = set()
        while len(reported) < len(ids):
            for round_id in ids:
                if round_id in reported:
                    continue
                record = store.get_round(round_id)
                if record.status not in _TERMINAL:
                    break
                reported.add(round_id)
                counts = dispatcher.per_round.get(round_id, [0.0, 0.0, 0.0, 0.0])
                outcome = RoundOutcome(
                    id=round_id,
                    status=record.status,
                    reason=record.reason or "",
                    seconds=round((record.ended or 0.0) - (record.started or record.created), 4),
                    num_clients=record.num_clients,
                    metrics=dict(record.metrics),
                    job_seconds=round(counts[0], 4),
                    jobs=int(counts[1]),
                    dropped=int(counts[2]),
                    stragglers=int(counts[3]),
                )
                report.rounds.append(outcome)
                emit(
                    "round",
                    {**dataclasses.asdict(outcome), "total": len(ids), "done": len(reported)},
                )
            if len(reported) < len(ids):
                await asyncio.sleep(0.05)
        head = store.head()
        if head is not None:
            report.head_version, report.head_digest = head.version, head.digest
        stats = await backend.stats()
        report.peak_rss = {
            "coordinator": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "workers": sum(int(s.get("peak_rss", 0)) for s in stats),
        }
        report.peak_rss["total"] = report.peak_rss["coordinator"] + report.peak_rss["workers"]
    except (asyncio.CancelledError, KeyboardInterrupt):
        report.interrupted = True
        engine_round = coordinator.busy_round()
        if engine_round is not None:
            run.setdefault("interrupted", []).append(engine_round)
        if run.get("ids"):
            _write_run(config, run)
        raise
    finally:
        if serving is not None:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        if dispatcher is not None:
            await dispatcher.close()
        with contextlib.suppress(Exception):
            await backend.close()
        await coordinator.stop(INTERRUPTED if report.interrupted else "simulation finished")
    report.wall_s = round(time.perf_counter() - started, 3)
    return report


def _refuse_leftover_rounds(config: Config) -> None:
    """Refuse to start a new run over rounds an earlier one left queued (they would run first).

    Raises:
        ConflictError: The store holds queued rounds.
    """
    try:
        require_state(config)
    except FlctlError:
        return  # a new state folder (a damaged one is refused when the coordinator opens it)
    store = open_store(config, read_only=True)
    try:
        leftover = store.next_queued_round()
    finally:
        store.close()
    if leftover is not None:
        raise ConflictError(
            f"queued rounds of an earlier run wait in {config.state_path} "
            f"(round {leftover.id} first)",
            hint="finish them with `flctl simulate --resume`, or give the new run a "
            "project.state_dir of its own",
        )


def _marker(run: dict[str, Any], backend: Backend) -> dict[str, Any]:
    """What each simulated round records in its config."""
    return {
        "clients": run["clients"],
        "per_round": run["per_round"],
        "backend": backend.name,
        "workers": backend.workers,
    }
