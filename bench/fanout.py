"""Fan-out: one coordinator serving 10 to 100 concurrent clients, tiny and 4 MB models.

For each model size and client count, in a fresh project: `flctl serve` in its own process
(mutual TLS on 127.0.0.1), the swarm of torch-free clients (flctl/client/_swarm.py: real gRPC,
one certificate and channel per client, a simulated training step) in another, and
`flctl round start --rounds R --wait`. Rounds start once every client is connected.

Per configuration it reports:

- round time: round.started -> round.committed in the coordinator's event log (median of R);
- per-client overhead: (round time - the slowest client's own work, i.e. its training step)
  / N, everything else in a round being the coordinator's and the transfers' cost;
- the clients' median and slowest download and upload times;
- coordinator peak RSS (VmHWM of the serve process) and its CPU seconds (utime + stime from
  /proc) over the rounds, and per round; the swarm's CPU seconds over the same span;
- memory growth per client: (peak RSS at the largest N - peak RSS at the smallest N) /
  (difference in N), per model;
- the state store's throughput: events written per second and rounds committed per second
  over the span of the rounds (first round.started -> last round.committed).

``--store postgresql`` runs the same on a PostgreSQL store (``[store] url``): a throw-away
server (tests/postgres.py, with PostgreSQL's durable defaults: fsync and synchronous commits,
as SQLite's synchronous=FULL) with a new database per configuration; ``--store sqlite
postgresql`` runs both, one after the other, so that the cost of the shared database shows.

    python bench/fanout.py [--clients 10 25 50 100] [--models tiny 4mb] [--rounds 3]
        [--store sqlite postgresql] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLCTL = [sys.executable, "-m", "flctl"]
SWARM = [sys.executable, "-m", "flctl.client._swarm"]
#: name -> (template params, depth): Linear(w, w) with w = sqrt(params / depth).
MODELS = {
    "tiny": (64, 1),  # 8 x 8 + 8 floats: 288 bytes of weights
    "4mb": (1 << 20, 1),  # 1024 x 1024 + 1024 floats: 4.0 MiB
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_project(root: Path, model: str, clients: int, store_url: str = "") -> Path:
    params, depth = MODELS[model]
    run([*FLCTL, "init", "p", "--template", "large", "--params", str(params)], cwd=root)
    project = root / "p"
    toml = (project / "flctl.toml").read_text()
    toml = toml.replace("min_clients = 2", f"min_clients = {clients}")
    toml = toml.replace("depth = 8 ", f"depth = {depth} ")
    toml = toml.replace("quorum_timeout_s = 120.0", "quorum_timeout_s = 300.0")
    if store_url:
        toml = toml.replace("\n[task]", f'\n[store]\nurl = "{store_url}"\n\n[task]', 1)
    (project / "flctl.toml").write_text(toml)
    run([*FLCTL, "certs", "gen", "--clients", str(clients)], cwd=project)
    return project


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise SystemExit(f"timed out waiting for {what}")


def one_config(
    model: str, clients: int, rounds: int, tmp: Path, store_url: str = ""
) -> dict[str, Any]:
    project = make_project(tmp, model, clients, store_url)
    serve_log = (project / "serve.log").open("w")
    serve = subprocess.Popen(
        [*FLCTL, "serve", "--address", "127.0.0.1:0", "--no-tui"],
        cwd=project,
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    swarm: subprocess.Popen[str] | None = None
    try:
        serve_file = project / ".flctl" / "serve.json"
        wait_for(lambda: serve.poll() is not None or serve_file.exists(), 120, "serve.json")
        if serve.poll() is not None:
            raise SystemExit((project / "serve.log").read_text()[-3000:])
        run([*FLCTL, "models", "export", "1", "-o", "model.safetensors"], cwd=project)
        idle_rss = peak_rss_mib(serve.pid)
        swarm = subprocess.Popen(
            [
                *SWARM,
                "--spec",
                "model.safetensors",
                "--clients",
                str(clients),
                "--rounds",
                str(rounds),
                "--timeout",
                "600",
                "--json",
            ],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def connected() -> bool:
            status = json.loads(run([*FLCTL, "round", "status", "--json"], cwd=project))
            return int(status["connected_clients"]) >= clients

        wait_for(connected, 300, f"{clients} clients connected", step=0.5)
        joined_rss = peak_rss_mib(serve.pid)
        load_before = os.getloadavg()[0]
        cpu_before = cpu_seconds(serve.pid)
        swarm_cpu_before = cpu_seconds(swarm.pid)
        begin = time.perf_counter()
        run([*FLCTL, "round", "start", "--rounds", str(rounds), "--wait", "--json"], cwd=project)
        rounds_wall = time.perf_counter() - begin
        cpu_rounds = cpu_seconds(serve.pid) - cpu_before
        swarm_cpu = cpu_seconds(swarm.pid) - swarm_cpu_before
        out, err = swarm.communicate(timeout=300)
        if swarm.returncode != 0:
            raise SystemExit(f"swarm exited {swarm.returncode}:\n{err[-3000:]}\n{out[-3000:]}")
        report = json.loads(out)
        peak = peak_rss_mib(serve.pid)
        every = json.loads(run([*FLCTL, "events", "--limit", "1000000", "--json"], cwd=project))
        events = [e for e in every["events"] if e["type"].startswith("round.")]
    finally:
        if swarm is not None and swarm.poll() is None:
            swarm.kill()
            swarm.wait()
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        serve_log.close()

    started = {e["round"]: e["time"] for e in events if e["type"] == "round.started"}
    committed = {e["round"]: e["time"] for e in events if e["type"] == "round.committed"}
    if sorted(committed) != sorted(started) or len(committed) != rounds:
        raise SystemExit(f"rounds did not all commit: {events}")
    per_round = {r["server_round"]: r for r in report["per_round"]}
    round_times = [committed[r] - started[r] for r in sorted(committed)]
    overheads = [
        (committed[r] - started[r] - per_round[r]["max_train_s"]) / clients
        for r in sorted(committed)
    ]
    first, last = min(started.values()), max(committed.values())
    span = last - first
    written = [e for e in every["events"] if first <= e["time"] <= last]
    return {
        "store": "postgresql" if store_url else "sqlite",
        "events_per_s": len(written) / span if span > 0 else float("nan"),
        "rounds_per_s": rounds / span if span > 0 else float("nan"),
        "model": model,
        "model_bytes": (project / "model.safetensors").stat().st_size,
        "clients": clients,
        "rounds": rounds,
        "errors": report["errors"],
        "round_s_median": statistics.median(round_times),
        "round_s": [round(t, 4) for t in round_times],
        "overhead_ms_per_client_median": 1000 * statistics.median(overheads),
        "max_train_s_median": statistics.median(r["max_train_s"] for r in report["per_round"]),
        "download_s_median": statistics.median(r["median_download_s"] for r in report["per_round"]),
        "download_s_max": max(r["max_download_s"] for r in report["per_round"]),
        "upload_s_median": statistics.median(r["median_upload_s"] for r in report["per_round"]),
        "upload_s_max": max(r["max_upload_s"] for r in report["per_round"]),
        "join_s_max": max(c["join_s"] for c in report["per_client"]),
        "coordinator_idle_rss_mib": idle_rss,
        "coordinator_joined_rss_mib": joined_rss,
        "coordinator_peak_rss_mib": peak,
        "coordinator_cpu_s_rounds": cpu_rounds,
        "coordinator_cpu_s_per_round": cpu_rounds / rounds,
        "coordinator_cpu_ms_per_client_round": 1000 * cpu_rounds / rounds / clients,
        "swarm_cpu_s_rounds": swarm_cpu,
        "rounds_wall_s": rounds_wall,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
    }


def growth(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for store, model in dict.fromkeys((r["store"], r["model"]) for r in rows):
        mine = sorted(
            (r for r in rows if (r["store"], r["model"]) == (store, model)),
            key=lambda r: r["clients"],
        )
        if len(mine) >= 2 and mine[-1]["clients"] > mine[0]["clients"]:
            delta = mine[-1]["coordinator_peak_rss_mib"] - mine[0]["coordinator_peak_rss_mib"]
            out[f"{store} {model}"] = delta / (mine[-1]["clients"] - mine[0]["clients"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "4mb"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    server = None
    if "postgresql" in args.store:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.postgres import PostgresServer

        server = PostgresServer(durable=True)
        server.start()
    rows = []
    try:
        for store in args.store:
            for model in args.models:
                for clients in args.clients:
                    url = server.new_database() if store == "postgresql" and server else ""
                    with tempfile.TemporaryDirectory(dir=os.environ.get("FLCTL_BENCH_TMP")) as tmp:
                        row = one_config(model, clients, args.rounds, Path(tmp), url)
                    rows.append(row)
                    print(
                        f"  {store}: {model} x {clients} clients: round "
                        f"{row['round_s_median']:.2f} s, {row['events_per_s']:.0f} events/s, "
                        f"{row['errors']} errors",
                        file=sys.stderr,
                    )
    finally:
        if server is not None:
            server.stop()
    result = {"rows": rows, "rss_growth_mib_per_client": growth(rows), "rounds": args.rounds}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        "| store | model | clients | round s (median) | events/s | rounds/s | slowest train s | overhead ms/client "
        "| coordinator CPU s/round "
        "(ms/client) | coordinator peak RSS MiB | download s med / max | upload s med / max "
        "| swarm CPU s/round | errors | load1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['store']} | {r['model']} ({r['model_bytes']:,} B) | {r['clients']} "
            f"| {r['round_s_median']:.2f} | {r['events_per_s']:.0f} | {r['rounds_per_s']:.2f} "
            f"| {r['max_train_s_median']:.3f} | {r['overhead_ms_per_client_median']:.1f} "
            f"| {r['coordinator_cpu_s_per_round']:.2f} ({r['coordinator_cpu_ms_per_client_round']:.0f}) "
            f"| {r['coordinator_peak_rss_mib']:.0f} "
            f"| {r['download_s_median']:.2f} / {r['download_s_max']:.2f} "
            f"| {r['upload_s_median']:.2f} / {r['upload_s_max']:.2f} "
            f"| {r['swarm_cpu_s_rounds'] / r['rounds']:.2f} | {r['errors']} "
            f"| {r['load1_before']:.1f} |"
        )
    for model, mib in result["rss_growth_mib_per_client"].items():
        print(f"coordinator peak RSS growth, {model}: {mib:.3f} MiB per client")


if __name__ == "__main__":
    main()
