"""A coordinator under a flood of idle TCP connections, with and without flctl's bounds.

A fresh project (the tiny integration task), certificates, ``flctl serve`` and two ``flctl join``
processes on 127.0.0.1 over mutual TLS. An attacker on another loopback address (127.0.0.2)
opens ``--connections`` TCP connections that never send a byte and keeps reopening those the
coordinator closes (at most ``--rate`` new ones a second). Every half second the bench records
the connections the coordinator holds (its established sockets on its port, from /proc), its
open descriptors and its RSS. Once the flood has run ``--warmup`` seconds, a round is started
(``flctl round start --wait --json``, from 127.0.0.1) and its wall time is recorded, beside the
same round's time with no flood.

Modes:

- ``bounded``: flctl's defaults (handshake timeout 5 s, 256 connections per peer, 4096 in all);
- ``unbounded``: what a coordinator did before the bounds (gRPC's 120 s handshake timeout, no
  per-peer bound, no total bound below the descriptor limit).

    python bench/flood.py [--connections 10000] [--rate 2000] [--seconds 40] [--warmup 15]
        [--mode bounded|unbounded ...] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flctl.transport.grpc import count_connections

REPO = Path(__file__).resolve().parents[1]
TINY_TASK = REPO / "tests" / "integration" / "tiny_task.py"
FLCTL = [sys.executable, "-m", "flctl"]
ATTACKER = "127.0.0.2"

MODES = {
    "bounded": {},
    "unbounded": {
        "handshake_timeout_s": 120.0,
        "max_connections": 1_000_000,
        "max_connections_per_peer": 1_000_000,
    },
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project(root: Path, port: int, server: dict[str, float]) -> None:
    root.mkdir(parents=True)
    extra = "".join(f"{k} = {v}\n" for k, v in server.items())
    (root / "flctl.toml").write_text(
        f'[project]\ntask = "tiny_task.py"\nseed = 1\n\n[server]\naddress = "127.0.0.1:{port}"\n'
        f"heartbeat_interval_s = 1.0\n{extra}\n[rounds]\nmin_clients = 2\ndeadline_s = 300.0\n"
        "quorum_timeout_s = 300.0\n"
    )
    shutil.copy(TINY_TASK, root / "tiny_task.py")
    subprocess.run(
        [*FLCTL, "certs", "gen", "--clients", "2"], cwd=root, check=True, capture_output=True
    )


def _proc_stats(pid: int) -> tuple[int, float]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return fds, rss_kb / 1024


def _round(root: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [*FLCTL, "round", "start", "--wait", "--json"], cwd=root, capture_output=True, text=True
    )
    wall = time.monotonic() - started
    status = json.loads(result.stdout)["rounds"][0]["status"] if result.stdout else "?"
    if status != "committed":
        raise SystemExit(f"round ended {status}: {result.stdout}{result.stderr}")
    return wall


class Flood:
    """Idle connections from ATTACKER, reopened when the coordinator closes them."""

    def __init__(self, port: int, target: int, rate: float) -> None:
        self.port, self.target, self.rate = port, target, rate
        self.socks: list[socket.socket] = []
        self.opened = self.closed_by_peer = self.refused = 0

    def step(self, seconds: float) -> None:
        alive = []
        for sock in self.socks:
            try:
                gone = sock.recv(1) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                self.closed_by_peer += 1
                sock.close()
            else:
                alive.append(sock)
        self.socks = alive
        budget = int(self.rate * seconds)
        while len(self.socks) < self.target and budget > 0:
            budget -= 1
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((ATTACKER, 0))
            try:
                sock.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            except OSError:
                self.refused += 1
                sock.close()
                continue
            self.opened += 1
            self.socks.append(sock)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def run(mode: str, args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"flctl-flood-{mode}-"))
    port = _free_port()
    root = work / "proj"
    _project(root, port, MODES[mode])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*FLCTL, *argv], cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        procs.append(proc)
        return proc

    flood = Flood(port, args.connections, args.rate)
    samples: list[dict[str, float]] = []
    try:
        coordinator = start("coordinator", "serve", "--no-tui")
        deadline = time.monotonic() + 120
        while not (root / ".flctl" / "serve.json").exists():
            if time.monotonic() > deadline:
                raise SystemExit("the coordinator did not start")
            time.sleep(0.2)
        for client in ("c1", "c2"):
            start(client, "join", "--client-id", client, "--threads", "1")
        _round(root)  # waits for both clients to join
        calm = _round(root)
        fds0, rss0 = _proc_stats(coordinator.pid)
        began = time.monotonic()
        flooded_round: float | None = None
        while time.monotonic() - began < args.seconds:
            flood.step(0.5)
            time.sleep(0.5)
            fds, rss = _proc_stats(coordinator.pid)
            held = count_connections(port).get(ATTACKER, 0)
            samples.append(
                {
                    "t": round(time.monotonic() - began, 1),
                    "held": held,
                    "fds": fds,
                    "rss_mib": round(rss, 1),
                }
            )
            if flooded_round is None and time.monotonic() - began >= args.warmup:
                flooded_round = _round(root)  # blocks: the flood pauses its reopening meanwhile
        return {
            "mode": mode,
            "limits": MODES[mode] or "defaults",
            "round_s_calm": round(calm, 2),
            "round_s_flooded": round(flooded_round or float("nan"), 2),
            "idle": {"fds": fds0, "rss_mib": round(rss0, 1)},
            "max_held": max(s["held"] for s in samples),
            "max_fds": max(s["fds"] for s in samples),
            "max_rss_mib": max(s["rss_mib"] for s in samples),
            "opened": flood.opened,
            "closed_by_coordinator": flood.closed_by_peer,
            "samples": samples if args.trace else len(samples),
        }
    finally:
        flood.close()
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--mode", nargs="+", default=["bounded", "unbounded"], choices=list(MODES))
    parser.add_argument("--trace", action="store_true", help="every sample in the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the project folders")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = [run(mode, args) for mode in args.mode]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(
            f"{r['mode']:>9}: held max {r['max_held']}, fds max {r['max_fds']} (idle {r['idle']['fds']}), "
            f"RSS max {r['max_rss_mib']} MiB (idle {r['idle']['rss_mib']}), round {r['round_s_calm']} s calm / "
            f"{r['round_s_flooded']} s flooded; opened {r['opened']}, closed by the coordinator "
            f"{r['closed_by_coordinator']}"
        )


if __name__ == "__main__":
    main()
