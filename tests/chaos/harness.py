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

Fail-over (``TrialSpec(failover=True, store_url=...)``): the store is a PostgreSQL database
(``[store] url``) and the blobs a shared folder (``[store] blobs``), and two coordinators run,
each in a project folder of its own (``a`` and ``b``: one machine each, the same certificates
and flctl.toml) on a fixed port of its own; the first to start leads, the other stands by.
Clients join with ``--server A,B`` and the rounds are queued with ``round start --server A,B``.
A kill waits for the same triggers (what the leader writes; ``upload``: a part file under
``<blobs>/uploads`` grew), SIGKILLs the coordinator whose health service says SERVING, and
measures how long until the other one's says SERVING (the take-over) and until the next
``round.committed`` event; then it starts the killed one again, which stands by (NOT_SERVING),
and only then may the next trigger fire. The checks add the leadership's: one ``leaders`` row
per epoch, 1 to kills + 1, and no event written out of its epoch.

Used by ``tests/chaos/test_chaos.py`` (a few trials), ``bench/chaos.py`` (many) and
``bench/failover.py`` (fail-over trials).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.chaos.invariants import (
    READ_ERRORS,
    TERMINAL,
    Check,
    KillPoint,
    StateReader,
    check_invariants,
)

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
            defers it until round 1 ends. Not with ``failover``.
        store_url: ``[store] url``: the state in this (empty) PostgreSQL database, the blobs in
            the trial's ``blobs`` folder (``[store] blobs``); "" for SQLite in the state folder.
        failover: Two coordinators on ``store_url``, one leading and one standing by; each
            kill is of the leader (module docstring).
        fit_sleep_s: Every ``fit`` of the tiny task takes at least this long (0: as long as it
            takes), so that a job lasts long enough for its kills.
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
    store_url: str = ""
    failover: bool = False
    fit_sleep_s: float = 0.0

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
        if self.failover and not self.store_url:
            raise ValueError("failover needs store_url: standbys share a PostgreSQL store")
        if self.failover and self.rollback:
            raise ValueError("rollback is not drawn in fail-over trials")

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

    def config(self, blobs: Path | None = None) -> str:
        """The project's flctl.toml (with ``store_url``: ``[store]``, blobs in ``blobs``)."""
        store = (
            f'\n[store]\nurl = "{self.store_url}"\nblobs = "{blobs}"\n' if self.store_url else ""
        )
        sleep = f"fit_sleep_s = {self.fit_sleep_s}\n" if self.fit_sleep_s else ""
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
{sleep}{store}"""


@dataclass
class Kill:
    """One planned SIGKILL and what the coordinator was doing when it landed.

    Attributes:
        trigger: What it waited for.
        delay_s: Its seeded delay after the trigger fired.
        fired: False when the job ended before the trigger came.
        server_round: The round open when it landed (None: none was).
        phase: That round's status as the killed coordinator left it ("idle": none open).
        uploads_in_flight: Part files holding bytes under ``uploads/`` then (in the state
            folder, or in the shared blob folder).
        temp_blobs: Files under ``blobs/tmp`` then.
        last_seq: The last event the killed coordinator wrote.
        restart_s: From the kill until the next coordinator was serving (fail-over: until
            the killed one, started again, stood by).
        killed: Fail-over: the address of the leader it killed.
        epoch: Fail-over: the epoch that leader led in.
        killed_at: Fail-over: when it landed (unix seconds, as events' ``time``).
        takeover_s: Fail-over: from the kill until the other coordinator's health service
            said SERVING.
        next_commit_s: Fail-over: from the kill until the next ``round.committed`` event
            (None: no round committed after it).
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
    killed: str = ""
    epoch: int = 0
    killed_at: float = 0.0
    takeover_s: float | None = None
    next_commit_s: float | None = None

    def point(self) -> KillPoint:
        """Where it landed, for the invariants."""
        return KillPoint(self.last_seq, self.server_round, self.phase)


@dataclass
class TrialResult:
    """What one trial did and found.

    Attributes:
        seed: The trial's seed.
        folder: Its project, state and logs (``logs/coordinator-N.log``, ``logs/cN.log``;
            fail-over: projects ``a`` and ``b``, ``blobs``, ``logs/coordinator-a-N.log``).
        kills: The kills, in order.
        rounds: Per round: id, status, reason, and whether a restarted coordinator resumed it.
        checks: The invariants (empty when the trial did not get that far).
        error: Why the trial stopped early ("" when it ran to its end).
        orphan_blobs: Blobs nothing names (a kill between storing an update and recording
            it leaves one; harmless, content-addressed, for garbage collection).
        accepted_updates: Accepted updates the store holds.
        lost_updates: Updates a client was told were accepted, or an ``update.accepted`` event
            records, that the store holds no accepted row of (should be 0).
        duration_s: Wall time of the trial.
    """

    seed: int
    folder: str
    kills: list[Kill] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    error: str = ""
    orphan_blobs: int = 0
    accepted_updates: int = 0
    lost_updates: int = 0
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
            "accepted_updates": self.accepted_updates,
            "lost_updates": self.lost_updates,
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
            + (f"; take-over {k.takeover_s:g}s" if k.takeover_s is not None else "")
            + (f", next commit {k.next_commit_s:g}s" if k.next_commit_s is not None else "")
            + (", no commit after" if k.takeover_s is not None and k.next_commit_s is None else "")
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


#: What ends a trial early (its ``error``): a reading of the store's included.
_STOPS: tuple[type[Exception], ...] = (
    TrialError,
    subprocess.SubprocessError,
    OSError,
    *READ_ERRORS,
)


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

    def start(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*FLCTL, *args],
                cwd=cwd or self.project,
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

    def stop_in_turn(self, *groups: list[str], timeout: float = 40) -> None:
        """SIGTERM each group's processes, and wait for them, before the next group's."""
        for group in groups:
            procs = [self.procs[name] for name in group if name in self.procs]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _addresses(count: int) -> list[str]:
    """``count`` loopback addresses, each on a different free port."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := _free_port()) not in ports:
            ports.append(port)
    return [f"127.0.0.1:{port}" for port in ports]


def _wait(predicate: Callable[[], T | None], timeout: float, what: str, step: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TrialError(f"{what}: not within {timeout:g} s")


class _Trial:
    """One job: its project, processes and the coordinator's successive lives.

    Fail-over: two project folders (``a``, ``b``), one coordinator each; ``slots`` names the
    process that runs in each ("" while a killed one is down), ``leader`` the one that leads.
    """

    def __init__(self, spec: TrialSpec, folder: Path) -> None:
        self.spec = spec
        self.project = folder / ("a" if spec.failover else "proj")
        self.projects = [self.project, folder / "b"] if spec.failover else [self.project]
        self.blobs = folder / "blobs" if spec.store_url else None
        self.reader = StateReader(self.project / ".flctl", spec.store_url, self.blobs)
        self.project.mkdir(parents=True)
        (folder / "logs").mkdir()
        (folder / "home").mkdir()
        self.procs = _Processes(self.project, folder / "logs", folder / "home")
        self.clients = [f"c{i + 1}" for i in range(spec.clients)]
        self.address = ""
        self.addresses: list[str] = []
        self.servers = ""  # what clients and admin commands are given: "A" or "A,B"
        self.lives = 0
        self.slots = [""] * len(self.projects)
        self.leader = 0
        self.leader_epoch = 0
        self.credentials = (b"", b"", b"")
        self.armed_seq = self.armed_unlogged = 0
        self.armed_parts: dict[str, int] = {}

    def setup(self) -> None:
        (self.project / "flctl.toml").write_text(self.spec.config(self.blobs))
        shutil.copy(TINY_TASK, self.project / "tiny_task.py")
        self.procs.run("certs", "gen", "--clients", str(self.spec.clients))
        for other in self.projects[1:]:  # another machine: the same task, certificates, store
            shutil.copytree(self.project, other)
        # one port per coordinator for every life of it, so that clients find it again
        self.addresses = _addresses(len(self.projects))
        self.address = self.addresses[0]
        self.servers = ",".join(self.addresses)
        if self.spec.failover:
            from flctl.security import load_credentials

            self.credentials = load_credentials(self.project / "certs", "admin")

    @property
    def server_args(self) -> tuple[str, ...]:
        """``--server A,B`` for admin commands in fail-over trials (else the serve file)."""
        return ("--server", self.servers) if self.spec.failover else ()

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
        names = [n for n in self.slots if n] if self.spec.failover else [self.coordinator_name]
        for name in names:
            proc = self.procs.procs[name]
            if proc.poll() is not None:
                raise TrialError(f"{name} exited {proc.returncode}: {self.procs.log(name)[-2000:]}")

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
            self.procs.start(client, "join", "--server", self.servers, "--client-id", client)

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

    # -- fail-over: two coordinators, the leader killed ------------------------------------

    def start_slot(self, slot: int) -> None:
        """Start (again) the coordinator of project folder ``slot``, on its own address."""
        self.lives += 1
        name = f"coordinator-{self.projects[slot].name}-{self.lives}"
        self.procs.start(
            name, "serve", "--address", self.addresses[slot], "--no-tui", cwd=self.projects[slot]
        )
        self.slots[slot] = name

    def health(self, slot: int) -> str:
        """What the health service on ``slot``'s address says (UNREACHABLE: nothing answers)."""
        from flctl.transport.grpc import probe_health

        cert, key, ca = self.credentials
        return probe_health(
            self.addresses[slot], cert_pem=cert, key_pem=key, ca_pem=ca, timeout=2.0
        )

    def wait_health(self, slot: int, want: str, timeout: float = 120) -> None:
        """Until ``slot``'s health service says ``want`` (SERVING, NOT_SERVING)."""

        def ready() -> bool:
            self._check_coordinator()
            return self.health(slot) == want

        _wait(ready, timeout, f"{self.slots[slot] or self.addresses[slot]} {want}")

    def now_leads(self, slot: int) -> None:
        """``slot`` said SERVING: note it, and the epoch it leads in."""
        pid = self.procs.procs[self.slots[slot]].pid
        rows = self.reader.query("SELECT MAX(epoch) FROM leaders WHERE pid = ?", (pid,))
        if not rows or rows[0][0] is None:
            raise TrialError(f"{self.slots[slot]} serves, but leaders has no row of pid {pid}")
        self.leader, self.leader_epoch = slot, int(rows[0][0])

    def start_pair(self) -> None:
        """``a`` leads (the clients start beside it), then ``b`` stands by."""
        self.start_slot(0)
        self.start_clients()
        self.wait_health(0, "SERVING")
        self.now_leads(0)
        self.start_slot(1)
        self.wait_health(1, "NOT_SERVING")

    def kill_leader(self, kill: Kill) -> None:
        """SIGKILL the leader, time the take-over, start it again as the standby."""
        if kill.delay_s:
            time.sleep(kill.delay_s)
        slot, other = self.leader, 1 - self.leader
        proc = self.procs.procs[self.slots[slot]]
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        kill.killed_at = time.time()
        proc.wait(30)
        self.slots[slot] = ""  # down until it is started again
        kill.fired = True
        kill.killed, kill.epoch = self.addresses[slot], self.leader_epoch
        # the other one may be taking over already: what the killed one wrote is its epoch's
        rows = self.reader.query("SELECT MAX(seq) FROM events WHERE epoch <= ?", (kill.epoch,))
        kill.last_seq = int(rows[0][0] or 0) if rows else 0
        kill.uploads_in_flight = self.reader.uploads_in_flight()
        kill.temp_blobs = self.reader.temp_blobs()
        open_round = self.reader.open_round()
        if open_round is not None:
            kill.server_round, kill.phase = open_round
        self.wait_health(other, "SERVING")
        kill.takeover_s = round(time.monotonic() - killed, 2)
        self.now_leads(other)
        self.start_slot(slot)
        self.wait_health(slot, "NOT_SERVING")
        kill.restart_s = round(time.monotonic() - killed, 2)
        self.arm()  # what the leader writes from now on can fire the next kill

    def next_commits(self, kills: list[Kill]) -> None:
        """Each fired kill's ``next_commit_s``: until the first round committed after it."""
        for kill in kills:
            if not kill.fired:
                continue
            rows = self.reader.query(
                "SELECT MIN(time) FROM events WHERE type = 'round.committed' AND time > ?",
                (kill.killed_at,),
            )
            if rows and rows[0][0] is not None:
                kill.next_commit_s = round(float(rows[0][0]) - kill.killed_at, 2)

    def stop(self) -> None:
        """SIGTERM every process: fail-over, clients, then the standby, then the leader last
        (so that no standby takes over from a leader that stops)."""
        if self.spec.failover:
            standbys = [n for i, n in enumerate(self.slots) if n and i != self.leader]
            self.procs.stop_in_turn(
                [n for n in self.procs.procs if not n.startswith("coordinator")],
                standbys,
                [self.slots[self.leader]],
            )
        self.procs.stop_all()

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


def _updates(reader: StateReader, told: dict[str, set[int]]) -> tuple[int, int]:
    """Accepted updates in the store, and those acknowledged or logged that it lacks."""
    rows = {
        (int(r), str(c))
        for r, c in reader.query(
            "SELECT server_round, client_id FROM updates WHERE status = 'accepted'"
        )
    }
    claimed = {(r, c) for c, rounds in told.items() for r in rounds}
    claimed |= {(r, c) for _, kind, r, c, _ in reader.events_after(0) if kind == "update.accepted"}
    return len(rows), len(claimed - rows)


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
        if spec.failover:
            trial.start_pair()
        else:
            trial.start_coordinator()
            trial.start_clients()
            trial.wait_coordinator()
        trial.wait_clients()
        trial.arm()
        trial.procs.run(
            "round", "start", "--rounds", str(spec.rounds), *trial.server_args, "--json"
        )
        if spec.rollback:  # in the background: the first kill may come before it returns
            trial.procs.start("rollback", "models", "rollback", "1", "--reason", "chaos trial")
        for kill in result.kills:
            if not trial.wait_trigger(kill.trigger):
                break
            if spec.failover:
                trial.kill_leader(kill)
            else:
                trial.kill(kill)
        _wait(
            lambda: trial.reader.all_terminal(spec.rounds), spec.bound_s, "every round ended", 0.2
        )
        alive = {c: trial.procs.procs[c].poll() is None for c in trial.clients}
        # A round ends in the tables a moment before its events are written: the state is
        # checked as the coordinator leaves it when it stops (SIGTERM) once every round ended.
        trial.stop()
        fired = [k for k in result.kills if k.fired]
        if spec.failover:
            trial.next_commits(fired)
        told = trial.acknowledged()
        result.checks = check_invariants(
            trial.reader,
            rounds=spec.rounds,
            acknowledged=told,
            kills=[k.point() for k in fired],
            clients_alive=alive,
            # on PostgreSQL each leader (a restarted or a standing-by coordinator) is an epoch
            epochs=len(fired) + 1 if spec.store_url else None,
        )
        result.orphan_blobs = trial.reader.orphan_blobs()
        result.accepted_updates, result.lost_updates = _updates(trial.reader, told)
    except _STOPS as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        trial.stop()
        try:
            result.rounds = trial.reader.rounds()
        except READ_ERRORS as exc:
            result.error = result.error or f"reading the rounds: {type(exc).__name__}: {exc}"
        trial.reader.close()
        result.duration_s = time.monotonic() - started
    return result
