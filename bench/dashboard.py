"""The dashboard's server-side page load on a large store, and what watching browsers cost a round.

1. ``load``: a project whose SQLite store holds ROUNDS rounds and EVENTS events (written straight
   into the database, as a long-running federation would have left them), a real ``flctl serve``
   and ``flctl dashboard``. Each page's requests are timed over HTTP, each on a cold cache (an
   Admin ``Tag`` call first writes an event, which invalidates the dashboard's read cache), so
   every request reaches the coordinator and its store.
2. ``watch``: a real coordinator with 3 ``flctl join`` clients (the tiny task), rounds started
   through the Admin service; the same number of rounds with no browser watching and with
   WATCHERS simulated browsers (each follows ``/api/stream`` and re-reads ``/api/overview`` 150
   ms after each event, as the page does). The round durations are compared.

    python bench/dashboard.py load --rounds 10000 --events 1000000
    python bench/dashboard.py watch --watchers 20 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_TASK = REPO / "tests" / "integration" / "tiny_task.py"
FLCTL = [sys.executable, "-m", "flctl"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _project(root: Path, min_clients: int, template: str = "tiny") -> Path:
    proj = root / "proj"
    # the bench's own Admin calls (an event before each request) exceed an operator's pace
    server = "[server]\nrate_limit_per_s = 1000.0\nrate_limit_burst = 1000\n"
    if template == "digits":
        subprocess.run(
            [*FLCTL, "init", str(proj), "--template", "digits"],
            check=True,
            env=ENV,
            capture_output=True,
        )
        config = (proj / "flctl.toml").read_text()
        (proj / "flctl.toml").write_text(config.replace("[server]\n", server, 1))
    else:
        proj.mkdir()
        (proj / "flctl.toml").write_text(
            f'[project]\ntask = "tiny_task.py"\n[rounds]\nmin_clients = {min_clients}\n' + server
        )
        shutil.copy(TINY_TASK, proj / "tiny_task.py")
    subprocess.run(
        [*FLCTL, "certs", "gen", "--clients", "3"],
        cwd=proj,
        check=True,
        env=ENV,
        capture_output=True,
    )
    return proj


def _start(proj: Path, logs: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    out = (logs / f"{name}.log").open("wb")
    return subprocess.Popen(
        [*FLCTL, *args], cwd=proj, stdout=out, stderr=subprocess.STDOUT, env=ENV
    )


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"{what} not within {timeout} s")


def _serve(proj: Path, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = _start(proj, logs, "serve", "serve", "--address", "127.0.0.1:0", "--no-tui")

    def ready() -> str | None:
        try:
            info = json.loads((proj / ".flctl" / "serve.json").read_text())
        except (OSError, ValueError):
            return None
        return str(info["address"]) if info.get("pid") == proc.pid else None

    return proc, _wait(ready, 120, "serve listening")


def _dashboard(proj: Path, logs: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = _start(proj, logs, "dashboard", "dashboard", "--address", "127.0.0.1:0")

    def ready() -> int | None:
        found = re.search(
            r"dashboard: http://127.0.0.1:(\d+)/", (logs / "dashboard.log").read_text()
        )
        return int(found.group(1)) if found else None

    return proc, _wait(ready, 60, "dashboard listening")


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get(port: int, path: str) -> tuple[int, float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - start
    conn.close()
    return response.status, elapsed, len(body)


def _healthz(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/healthz")
    answer: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def _overview(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/overview")
    answer: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def _fill(db: Path, rounds: int, events: int) -> None:
    """ROUNDS committed rounds and EVENTS events, written as a coordinator writes them."""
    conn = sqlite3.connect(db)
    now = time.time() - rounds * 60
    rng = random.Random(0)
    conn.executemany(
        "INSERT INTO rounds (status, created, started, ended, base_version, model_version,"
        " num_clients, selected, metrics, reason, deadline, config) VALUES"
        " ('committed', ?, ?, ?, 1, 1, 3, '[\"c1\",\"c2\",\"c3\"]', ?, '', ?, '{}')",
        (
            (
                now + i * 60,
                now + i * 60 + 1,
                now + i * 60 + 30,
                json.dumps({"accuracy": 0.5 + i / rounds / 2, "loss": 1.0 - i / rounds / 2}),
                now + i * 60 + 120,
            )
            for i in range(rounds)
        ),
    )
    kinds = ["client.state", "update.accepted", "round.status", "task.sent", "update.scored"]
    per_round = max(1, events // max(rounds, 1))

    def rows() -> Any:
        for i in range(events):
            kind = "round.committed" if i % per_round == per_round - 1 else rng.choice(kinds)
            yield (
                now + i * 60 / per_round,
                kind,
                i // per_round + 1,
                f"c{i % 3 + 1}",
                '{"state": "training", "progress": 0.5}',
            )

    conn.executemany(
        "INSERT INTO events (time, type, server_round, client_id, data, epoch)"
        " VALUES (?, ?, ?, ?, ?, 0)",
        rows(),
    )
    conn.commit()
    conn.close()


async def _tag(proj: Path, address: str, name: str) -> None:
    from flctl.cli._common import admin_client, load_project

    config = load_project(proj / "flctl.toml")
    client = admin_client(config, address)
    try:
        await client.tag("1", name, force=True)
    finally:
        await client.close()


def load(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="flctl-bench-dash-"))
    logs = root / "logs"
    logs.mkdir()
    proj = _project(root, 3)
    subprocess.run([*FLCTL, "store", "init"], cwd=proj, check=True, env=ENV, capture_output=True)
    started = time.perf_counter()
    _fill(proj / ".flctl" / "state.db", args.rounds, args.events)
    print(
        f"store filled: {args.rounds} rounds, {args.events} events in "
        f"{time.perf_counter() - started:.0f} s ({(proj / '.flctl' / 'state.db').stat().st_size / 2**20:.0f} MiB)"
    )
    serve, address = _serve(proj, logs)
    dash, port = _dashboard(proj, logs)
    paths = [
        "/",
        "/api/overview",
        "/api/rounds?limit=50",
        f"/api/rounds/{args.rounds // 2}",
        "/api/clients",
        "/api/models?limit=100",
        "/api/events?limit=100",
        "/api/events?limit=100&type=admin",
        "/api/events?limit=100&type=round.committed",
        f"/api/events?limit=100&before={args.events // 2}",
    ]
    try:
        _wait(lambda: _get(port, "/api/overview")[0] == 200, 60, "the dashboard reading the store")
        results: dict[str, list[float]] = {p: [] for p in paths}
        for i in range(args.repeat):
            for j, path in enumerate(paths):
                # a cold cache: an event the dashboard has seen, and more than the 0.5 s a
                # read is kept however many events arrive
                seen = _healthz(port)["seq"]
                asyncio.run(_tag(proj, address, f"bench-{i}-{j}"))  # a new tag: an event
                _wait(
                    lambda s=seen: _healthz(port)["seq"] > s, 10, "the dashboard seeing the event"
                )
                time.sleep(0.6)
                status, elapsed, size = _get(port, path)
                if status != 200:
                    raise SystemExit(f"{path}: HTTP {status}")
                results[path].append(elapsed)
        print(f"\n{'request (cold cache)':<48} {'median ms':>9} {'max ms':>8}")
        for path, times in results.items():
            print(f"{path:<48} {statistics.median(times) * 1000:9.1f} {max(times) * 1000:8.1f}")
        page = [statistics.median(results["/"]), statistics.median(results["/api/overview"])]
        print(f"\noverview page (HTML + its JSON), median: {sum(page) * 1000:.1f} ms")
    finally:
        _stop(dash, serve)
        shutil.rmtree(root, ignore_errors=True)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _watcher(
    port: int, stop: asyncio.Event, counts: list[int], lags: list[float], stale: list[float]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
    await writer.drain()
    pending: asyncio.Task[None] | None = None
    latest = [0, 0.0]  # newest event seq on the stream, and its time

    async def reread() -> None:
        # as the page does: re-read 150 ms after an event, again while the answer is behind
        await asyncio.sleep(0.15)
        while not stop.is_set():
            answer = await asyncio.to_thread(_overview, port)
            counts[0] += 1
            if answer["as_of_seq"] >= latest[0]:
                stale.append(time.time() - latest[1])  # event -> a page that shows it
                return
            await asyncio.sleep(0.6)

    try:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 0.5)
            except TimeoutError:
                continue
            if not line:
                return
            if not line.startswith(b"data:"):
                continue
            message = json.loads(line[5:])
            if message.get("kind") != "events" or not message["events"]:
                continue
            newest = message["events"][-1]
            lags.append(time.time() - newest["time_unix"])  # event -> the browser's stream
            latest[:] = [newest["seq"], newest["time_unix"]]
            if pending is None or pending.done():
                pending = asyncio.create_task(reread())
    finally:
        writer.close()


def watch(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="flctl-bench-dash-"))
    logs = root / "logs"
    logs.mkdir()
    proj = _project(root, 3, args.template)
    serve, address = _serve(proj, logs)
    clients = [
        _start(proj, logs, c, "join", "--client-id", c, "--server", address, "--threads", "1")
        for c in ("c1", "c2", "c3")
    ]
    dash, port = _dashboard(proj, logs)

    async def run_rounds(count: int, watchers: int) -> list[float]:
        from flctl.cli._common import admin_client, load_project

        config = load_project(proj / "flctl.toml")
        stop = asyncio.Event()
        counts = [0]
        lags: list[float] = []
        stale: list[float] = []
        tasks = [
            asyncio.create_task(_watcher(port, stop, counts, lags, stale)) for _ in range(watchers)
        ]
        client = admin_client(config, address)
        cpu = (_cpu_s(serve.pid), _cpu_s(dash.pid), time.process_time())
        try:
            ids = list((await client.start_round(count)).round_ids)
            while True:
                status = await client.status(ids)
                if all(
                    r.status in ("committed", "failed", "cancelled", "rejected")
                    for r in status.rounds
                ):
                    break
                await asyncio.sleep(0.5)
            bad = [r for r in status.rounds if r.status != "committed"]
            if bad:
                raise SystemExit(f"round {bad[0].server_round} {bad[0].status}: {bad[0].reason}")
            return [r.duration_s for r in status.rounds]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            used = (
                _cpu_s(serve.pid) - cpu[0],
                _cpu_s(dash.pid) - cpu[1],
                time.process_time() - cpu[2],
            )
            print(
                f"  CPU s: coordinator {used[0]:.2f}, dashboard {used[1]:.2f}, "
                f"the watchers (this process) {used[2]:.2f}"
            )
            if watchers:
                lags.sort()
                stale.sort()
                print(f"  ({watchers} watchers re-read the overview {counts[0]} times)")
                print(
                    f"  event -> stream: median {statistics.median(lags) * 1000:.0f} ms, "
                    f"p95 {lags[int(len(lags) * 0.95)] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms"
                    f" ({len(lags)} batches)"
                )
                print(
                    f"  event -> overview showing it: median "
                    f"{statistics.median(stale) * 1000:.0f} ms, p95 "
                    f"{stale[int(len(stale) * 0.95)] * 1000:.0f} ms, max {stale[-1] * 1000:.0f} ms"
                )

    try:
        asyncio.run(run_rounds(2, 0))  # warm-up: the clients' first fit
        print(f"{'watchers':>8} {'rounds':>6} {'median s':>9} {'mean s':>7}")
        rows = []
        for trial in range(args.trials):
            for watchers in (0, args.watchers):
                durations = asyncio.run(run_rounds(args.rounds, watchers))
                rows.append((watchers, durations))
                print(
                    f"{watchers:8d} {len(durations):6d} {statistics.median(durations):9.3f} "
                    f"{statistics.mean(durations):7.3f}   (trial {trial + 1})"
                )
        base = statistics.mean([d for w, ds in rows if w == 0 for d in ds])
        watched = statistics.mean([d for w, ds in rows if w for d in ds])
        print(
            f"\nmean round: {base:.3f} s alone, {watched:.3f} s with {args.watchers} watchers "
            f"({(watched / base - 1) * 100:+.1f} %)"
        )
    finally:
        _stop(dash, *clients, serve)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("load", help="page load on a large store")
    p.add_argument("--rounds", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p = sub.add_parser("watch", help="what watching browsers cost a round")
    p.add_argument("--watchers", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument(
        "--template",
        choices=["tiny", "digits"],
        default="tiny",
        help="tiny: rounds of ~0.2 s (the worst case); digits: the demo's task",
    )
    args = parser.parse_args()
    load(args) if args.what == "load" else watch(args)


if __name__ == "__main__":
    main()
