"""Chaos harness: a whole job as subprocesses, its coordinator killed with SIGKILL and restarted.

One trial (:func:`run_trial`) makes a project (the tiny integration task, ``min_clients = 2``,
a short deadline and rejoin grace, 0.5 s heartbeats, certificates for three clients), starts
``flctl serve`` on a fixed loopback port and three ``flctl join`` clients, waits until they have
joined, queues the rounds with ``flctl round start`` and then, for each planned kill, waits for
its trigger, sends SIGKILL to the coordinator and starts it again on the same port. The
clients are never touched: they must reconnect by themselves.

A kill waits for a trigger, read from the state database (read-only) or the state folder, then
for a seeded random delay:

================  ===============================================================
``moment``        the restarted coordinator is ready (delay: up to 4 s)
``selecting``     a round went to ``selecting``
``training``      a task was sent (clients are downloading or training; up to 0.5 s)
``upload``        a part file under ``uploads/`` grew (an update is mid-upload)
``accepted``      an update was accepted (others may still be on their way)
``aggregating``   a round went to ``aggregating``
``evaluating``    a round went to ``evaluating``
``committed``     a round's model was committed (its events may not all be written)
``unlogged``      the tables hold an accepted update or an ended round that the event
                  log does not record yet (the moment between a change and its event;
                  not drawn by default, ``triggers=("unlogged",)`` hunts for it)
================  ===============================================================

Once no round is left open, every process is stopped (SIGTERM) and
:func:`~tests.chaos.invariants.check_invariants` checks the state folder, with the
acknowledgements each client printed.

Used by ``tests/chaos/test_chaos.py`` (a few trials) and ``bench/chaos.py`` (many).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.chaos.invariants import TERMINAL, Check, KillPoint, StateReader, check_invariants

__all__ = [
    "DELAY_BOUNDS",
    "TRIGGERS",
    "Kill",
    "TrialError",
    "TrialResult",
    "TrialSpec",
    "run_trial",
]

REPO = Path(__file__).resolve().parents[2]
TINY_TASK = REPO / "tests" / "integration" / "tiny_task.py"
FLCTL = [sys.executable, "-m", "flctl"]

#: Every trigger a kill can wait for (module docstring), with the bound of its seeded delay.
DELAY_BOUNDS = {
    "moment": 4.0,
    "selecting": 0.0,
    "training": 0.5,
    "upload": 0.0,
    "accepted": 0.1,
    "aggregating": 0.05,
    "evaluating": 0.05,
    "committed": 0.0,
    "unlogged": 0.0,
}
#: The moments of a job a kill plan draws from by default.
TRIGGERS = tuple(t for t in DELAY_BOUNDS if t != "unlogged")
_TERMINAL_SQL = ", ".join(f"'{s}'" for s in TERMINAL)
_ENDED_SQL = ", ".join(f"'round.{s}'" for s in TERMINAL)
#: What a client prints when the coordinator acknowledged its update.
_ACK_RE = re.compile(r"round (\d+): update accepted")

T = TypeVar("T")


@dataclass(frozen=True)
class TrialSpec:
    """What one trial runs.

    Attributes:
        seed: Seeds the kill plan (triggers and delays) and the task.
        rounds: Rounds queued at once with ``flctl round start --rounds``.
        kills: SIGKILLs of the coordinator, each followed by a restart.
        clients: ``flctl join`` processes (c1, c2, ...); ``min_clients`` is 2.
        triggers: What the plan draws each kill's trigger from (default: :data:`TRIGGERS`,
            every moment but ``unlogged``).
        in_features: Width of the tiny task's linear model (``2 * in_features + 2`` floats),
            so that an update travels in several chunks.
        deadline_s: ``rounds.deadline_s``; a restart costs about 6-8 s on 2 cores, and the
            clients' backoff up to 10 s more.
        rejoin_grace_s: ``rounds.rejoin_grace_s``; the clients' backoff is capped at 10 s.
        quorum_timeout_s: ``rounds.quorum_timeout_s``.
        max_chunk_bytes: ``transport.max_chunk_bytes``.
        rollback: Right after queueing the rounds, while round 1 runs, ask for a rollback to
            version 1 with ``flctl models rollback`` (in the background): the coordinator
            defers it until round 1 ends.
    """

    seed: int
    rounds: int = 3
    kills: int = 2
    clients: int = 3
    triggers: tuple[str, ...] = TRIGGERS
    in_features: int = 50_000
    deadline_s: float = 30.0
    rejoin_grace_s: float = 10.0
    quorum_timeout_s: float = 30.0
    max_chunk_bytes: int = 16_384
    rollback: bool = False

    def __post_init__(self) -> None:
        if not self.triggers or any(t not in DELAY_BOUNDS for t in self.triggers):
            raise ValueError(
                f"triggers must be drawn from {tuple(DELAY_BOUNDS)!r}, not {self.triggers!r}"
            )
        if self.rounds < 1 or self.kills < 0 or self.clients < 2:
            raise ValueError(
                f"need rounds >= 1, kills >= 0 and clients >= 2, not {self.rounds!r}, "
                f"{self.kills!r}, {self.clients!r}"
            )

    def plan(self) -> list[tuple[str, float]]:
        """The seeded kill plan: (trigger, delay after it fires) per kill."""
        rng = random.Random(self.seed)
        plan = []
        for _ in range(self.kills):
            trigger = rng.choice(self.triggers)
            plan.append((trigger, round(rng.uniform(0.0, DELAY_BOUNDS[trigger]), 3)))
        return plan

    @property
    def bound_s(self) -> float:
        """How long the rounds may take, at most, once their clients are there."""
        return self.rounds * (self.quorum_timeout_s + self.deadline_s + 10.0) + 60.0

    def config(self) -> str:
        """The project's flctl.toml."""
        return f"""\
[project]
task = "tiny_task.py"
seed = {self.seed}

[server]
heartbeat_interval_s = 0.5

[rounds]
min_clients = 2
deadline_s = {self.deadline_s}
quorum_timeout_s = {self.quorum_timeout_s}
rejoin_grace_s = {self.rejoin_grace_s}

[transport]
max_chunk_bytes = {self.max_chunk_bytes}

[task]
in_features = {self.in_features}
"""


@dataclass
class Kill:
    """One planned SIGKILL and what the coordinator was doing when it landed.

    Attributes:
        trigger: What it waited for.
        delay_s: Its seeded delay after the trigger fired.
        fired: False when the job ended before the trigger came.
        server_round: The round open when it landed (None: none was).
        phase: That round's status as the killed coordinator left it ("idle": none open).
        uploads_in_flight: Part files holding bytes under ``<state>/uploads/`` then.
        temp_blobs: Files under ``<state>/blobs/tmp`` then.
        last_seq: The last event the killed coordinator wrote.
        restart_s: From the kill until the next coordinator was serving.
    """

    trigger: str
    delay_s: float
    fired: bool = False
    server_round: int | None = None
    phase: str = "idle"
    uploads_in_flight: int = 0
    temp_blobs: int = 0
    last_seq: int = 0
    restart_s: float = 0.0

    def point(self) -> KillPoint:
        """Where it landed, for the invariants."""
        return KillPoint(self.last_seq, self.server_round, self.phase)


@dataclass
class TrialResult:
    """What one trial did and found.

    Attributes:
        seed: The trial's seed.
        folder: Its project, state and logs (``logs/coordinator-N.log``, ``logs/cN.log``).
        kills: The kills, in order.
        rounds: Per round: id, status, reason, and whether a restarted coordinator resumed it.
        checks: The invariants (empty when the trial did not get that far).
        error: Why the trial stopped early ("" when it ran to its end).
        orphan_blobs: Blobs nothing names (a kill between storing an update and recording
            it leaves one; harmless, content-addressed, for garbage collection).
        duration_s: Wall time of the trial.
    """

    seed: int
    folder: str
    kills: list[Kill] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    error: str = ""
    orphan_blobs: int = 0
    duration_s: float = 0.0

    @property
    def held(self) -> bool:
        """Whether the trial ran to its end and every invariant held."""
        return not self.error and bool(self.checks) and all(c.held for c in self.checks)

    @property
    def committed(self) -> int:
        """Rounds committed."""
        return sum(r["status"] == "committed" for r in self.rounds)

    @property
    def failed(self) -> int:
        """Rounds that ended without moving the head: failed, cancelled or rejected."""
        return sum(r["status"] in ("failed", "cancelled", "rejected") for r in self.rounds)

    @property
    def resumed(self) -> int:
        """Rounds that a restarted coordinator resumed (each counted once)."""
        return sum(bool(r["resumed"]) for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "seed": self.seed,
            "held": self.held,
            "error": self.error,
            "duration_s": round(self.duration_s, 1),
            "committed": self.committed,
            "failed": self.failed,
            "resumed": self.resumed,
            "orphan_blobs": self.orphan_blobs,
            "kills": [asdict(k) for k in self.kills],
            "rounds": self.rounds,
            "checks": [asdict(c) for c in self.checks],
            "folder": self.folder,
        }

    def describe(self) -> str:
        """A few lines for people: kills, rounds, broken invariants, where the logs are."""
        kills = [
            f"{k.trigger}+{k.delay_s:g}s -> "
            + (f"round {k.server_round} {k.phase}" if k.server_round else "no round open")
            + (f", {k.uploads_in_flight} uploading" if k.uploads_in_flight else "")
            if k.fired
            else f"{k.trigger} (never came)"
            for k in self.kills
        ]
        rounds = [
            f"{r['id']} {r['status']}{' (resumed)' if r['resumed'] else ''}"
            + (f": {r['reason']}" if r["reason"] else "")
            for r in self.rounds
        ]
        lines = [
            f"seed {self.seed}: {'held' if self.held else 'BROKEN'} ({self.duration_s:.0f} s)",
            f"  kills: {'; '.join(kills) or 'none'}",
            f"  rounds: {'; '.join(rounds) or 'none'}",
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [f"  broken: {c.name}: {c.detail}" for c in self.checks if not c.held]
        lines.append(f"  folder: {self.folder}")
        return "\n".join(lines)


class TrialError(Exception):
    """The trial could not go on: a process did not start or left, a bound was reached."""


class _Processes:
    """The trial's subprocesses, each with a log file; stopped by PID at the end."""

    def __init__(self, project: Path, logs: Path, home: Path) -> None:
        self.project = project
        self.logs = logs
        self.env = {
            # no FLCTL_* setting of the caller's shell reaches the job
            **{k: v for k, v in os.environ.items() if not k.startswith("FLCTL_")},
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "FLCTL_HOME": str(home),  # `flctl` writes its error logs there
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [*FLCTL, *args],
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if result.returncode != 0:
            raise TrialError(
                f"flctl {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}"
            )
        return result.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*FLCTL, *args],
                cwd=self.project,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_all(self, timeout: float = 40) -> None:
        """SIGTERM every process still running (clients first), then wait; SIGKILL stragglers."""
        order = sorted(self.procs.items(), key=lambda item: item[0].startswith("coordinator"))
        for _, proc in order:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in order:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], T | None], timeout: float, what: str, step: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TrialError(f"{what}: not within {timeout:g} s")


class _Trial:
    """One job: its project, processes and the coordinator's successive lives."""

    def __init__(self, spec: TrialSpec, folder: Path) -> None:
        self.spec = spec
        self.project = folder / "proj"
        self.reader = StateReader(self.project / ".flctl")
        self.project.mkdir(parents=True)
        (folder / "logs").mkdir()
        (folder / "home").mkdir()
        self.procs = _Processes(self.project, folder / "logs", folder / "home")
        self.clients = [f"c{i + 1}" for i in range(spec.clients)]
        self.address = ""
        self.lives = 0
        self.armed_seq = self.armed_unlogged = 0
        self.armed_parts: dict[str, int] = {}

    def setup(self) -> None:
        (self.project / "flctl.toml").write_text(self.spec.config())
        shutil.copy(TINY_TASK, self.project / "tiny_task.py")
        self.procs.run("certs", "gen", "--clients", str(self.spec.clients))
        # one port for every life of the coordinator, so that clients find it again
        self.address = f"127.0.0.1:{_free_port()}"

    @property
    def coordinator_name(self) -> str:
        return f"coordinator-{self.lives}"

    @property
    def coordinator(self) -> subprocess.Popen[bytes]:
        return self.procs.procs[self.coordinator_name]

    def start_coordinator(self) -> None:
        self.lives += 1
        self.procs.start(self.coordinator_name, "serve", "--address", self.address, "--no-tui")

    def _check_coordinator(self) -> None:
        if self.coordinator.poll() is not None:
            raise TrialError(
                f"{self.coordinator_name} exited {self.coordinator.returncode}: "
                f"{self.procs.log(self.coordinator_name)[-2000:]}"
            )

    def wait_coordinator(self) -> None:
        """Until the coordinator serves: its ``coordinator.started`` event is written."""
        pid = self.coordinator.pid

        def ready() -> bool:
            self._check_coordinator()
            rows = self.reader.query(
                "SELECT data FROM events WHERE type = 'coordinator.started' "
                "ORDER BY seq DESC LIMIT 1"
            )
            return bool(rows) and json.loads(rows[0][0]).get("pid") == pid

        _wait(ready, 120, f"{self.coordinator_name} serving")

    def start_clients(self) -> None:
        for client in self.clients:
            self.procs.start(client, "join", "--server", self.address, "--client-id", client)

    def wait_clients(self) -> None:
        def joined() -> bool:
            for client in self.clients:
                if self.procs.procs[client].poll() is not None:
                    raise TrialError(f"{client} exited: {self.procs.log(client)[-2000:]}")
            self._check_coordinator()
            rows = self.reader.query(
                "SELECT COUNT(DISTINCT client_id) FROM events WHERE type = 'client.joined'"
            )
            return bool(rows) and rows[0][0] >= len(self.clients)

        _wait(joined, 180, "every client joined", step=0.2)

    def arm(self) -> None:
        """From now on, what the coordinator writes can fire the next trigger."""
        self.armed_seq = self.reader.last_seq()
        self.armed_parts = self.reader.parts()  # kept by an earlier life: not this one's bytes
        self.armed_unlogged = self._unlogged()

    def wait_trigger(self, trigger: str) -> bool:
        """Until ``trigger`` fires (True) or every round has ended (False)."""
        seen, held, unlogged = self.armed_seq, self.armed_parts, self.armed_unlogged
        started = time.monotonic()
        while time.monotonic() - started < self.spec.bound_s:
            self._check_coordinator()
            if trigger == "moment":
                return not self.reader.all_terminal(self.spec.rounds)  # its delay is the moment
            if trigger == "unlogged":
                if self._unlogged() > unlogged:
                    return True
            elif trigger == "upload":
                if any(size > held.get(name, 0) for name, size in self.reader.parts().items()):
                    return True
            else:
                for seq, kind, server_round, _, data in self.reader.events_after(seen):
                    seen = seq
                    if _fires(trigger, kind, server_round, data):
                        return True
            if self.reader.all_terminal(self.spec.rounds):
                return False
            time.sleep({"upload": 0.005, "unlogged": 0.001}.get(trigger, 0.01))
        raise TrialError(f"trigger {trigger!r} neither came nor did the rounds end")

    def _unlogged(self) -> int:
        """Accepted updates and ended rounds in the tables, less their events (one snapshot)."""
        rows = self.reader.query(
            "SELECT (SELECT COUNT(*) FROM updates WHERE status = 'accepted')"
            f" + (SELECT COUNT(*) FROM rounds WHERE status IN ({_TERMINAL_SQL}))"
            f" - (SELECT COUNT(*) FROM events WHERE type IN ('update.accepted', {_ENDED_SQL}))"
        )
        return int(rows[0][0] or 0) if rows else 0

    def kill(self, kill: Kill) -> None:
        """SIGKILL the coordinator, note where it was, start the next one."""
        if kill.delay_s:
            time.sleep(kill.delay_s)
        os.kill(self.coordinator.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.coordinator.wait(30)
        kill.fired = True
        self.arm()  # every event of the next life can fire the next kill
        kill.last_seq = self.armed_seq
        kill.uploads_in_flight = self.reader.uploads_in_flight()
        kill.temp_blobs = self.reader.temp_blobs()
        open_round = self.reader.open_round()
        if open_round is not None:
            kill.server_round, kill.phase = open_round
        self.start_coordinator()
        self.wait_coordinator()
        kill.restart_s = round(time.monotonic() - killed, 2)

    def acknowledged(self) -> dict[str, set[int]]:
        """Per client, the rounds it printed "update accepted" for."""
        return {c: {int(r) for r in _ACK_RE.findall(self.procs.log(c))} for c in self.clients}


def _fires(trigger: str, kind: str, server_round: int, data: dict[str, Any]) -> bool:
    if trigger == "training":
        return kind == "task.sent"
    if trigger == "accepted":
        return kind == "update.accepted"
    if trigger == "committed":
        return kind == "model.created" and server_round > 0 and data.get("kind") == "aggregate"
    return kind == "round.status" and data.get("status") == trigger


def run_trial(spec: TrialSpec, folder: Path) -> TrialResult:
    """Run one trial in ``folder`` (created; it keeps the project, state and logs).

    Every process the trial started is stopped, by PID, before this returns.

    Returns:
        The trial's kills, rounds and invariants; ``error`` says why it stopped early.
    """
    started = time.monotonic()
    result = TrialResult(seed=spec.seed, folder=str(folder))
    result.kills = [Kill(trigger, delay) for trigger, delay in spec.plan()]
    trial = _Trial(spec, folder)
    try:
        trial.setup()
        # the clients import torch while the coordinator does; they retry until it listens
        trial.start_coordinator()
        trial.start_clients()
        trial.wait_coordinator()
        trial.wait_clients()
        trial.arm()
        trial.procs.run("round", "start", "--rounds", str(spec.rounds), "--json")
        if spec.rollback:  # in the background: the first kill may come before it returns
            trial.procs.start("rollback", "models", "rollback", "1", "--reason", "chaos trial")
        for kill in result.kills:
            if not trial.wait_trigger(kill.trigger):
                break
            trial.kill(kill)
        _wait(
            lambda: trial.reader.all_terminal(spec.rounds), spec.bound_s, "every round ended", 0.2
        )
        alive = {c: trial.procs.procs[c].poll() is None for c in trial.clients}
        # A round ends in the tables a moment before its events are written: the state is
        # checked as the coordinator leaves it when it stops (SIGTERM) once every round ended.
        trial.procs.stop_all()
        result.checks = check_invariants(
            trial.reader,
            rounds=spec.rounds,
            acknowledged=trial.acknowledged(),
            kills=[k.point() for k in result.kills if k.fired],
            clients_alive=alive,
        )
        result.orphan_blobs = trial.reader.orphan_blobs()
    except (TrialError, subprocess.SubprocessError, OSError, sqlite3.Error) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        trial.procs.stop_all()
        try:
            result.rounds = trial.reader.rounds()
        except sqlite3.Error as exc:
            result.error = result.error or f"reading the rounds: {type(exc).__name__}: {exc}"
        result.duration_s = time.monotonic() - started
    return result
