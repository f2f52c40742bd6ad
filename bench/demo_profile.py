"""Where `flctl demo` spends its time: imports, start-up, handshakes, training, transfers.

Runs `flctl demo --json` as a user would, then reads the demo's persisted event log (every
state change is timestamped) to split each round into phases, and times the imports every
process pays in separate interpreters.

    python bench/demo_profile.py [--rounds 10] [--clients 3] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

IMPORTS = {
    "python (no imports)": "pass",
    "import torch": "import torch",
    "import flctl.cli (flctl --help)": "import flctl.cli",
    "import sklearn.datasets": "import sklearn.datasets",
    "import grpc + sqlmodel": "import grpc, sqlmodel",
}


def time_import(code: str, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_demo(rounds: int, clients: int, folder: Path) -> tuple[dict[str, Any], float, float]:
    launched = time.time()
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flctl",
            "demo",
            "--json",
            "--rounds",
            str(rounds),
            "--clients",
            str(clients),
            "--dir",
            str(folder / "demo"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"demo failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout), wall, launched


def phases(state_dir: Path, launched: float) -> dict[str, Any]:
    from flctl.store import SqlStore

    store = SqlStore.open(state_dir)
    try:
        events = store.events_since(0, limit=1_000_000)
    finally:
        store.close()
    started = next(e.time for e in events if e.type == "coordinator.started")
    joined = [e.time for e in events if e.type == "client.joined"]
    last_end = max(e.time for e in events if e.type in ("round.committed", "round.failed"))
    out: dict[str, Any] = {
        "coordinator_ready_s": started - launched,
        "rounds_total_s": last_end - max(joined) if joined else None,
        "last_client_joined_s": (max(joined) - started) if joined else None,
    }
    per_round: dict[int, dict[str, float]] = defaultdict(dict)
    client_phase: dict[str, list[float]] = defaultdict(list)
    last_state: dict[str, tuple[str, float]] = {}
    for e in events:
        r = per_round[e.server_round] if e.server_round else None
        if e.type == "round.started" and r is not None:
            r["started"] = e.time
        elif e.type == "round.status" and r is not None:
            r[e.data.get("status", "?")] = e.time
        elif e.type in ("round.committed", "round.failed") and r is not None:
            r["ended"] = e.time
        elif e.type == "update.accepted" and r is not None:
            r["last_update"] = e.time
            r.setdefault("first_update", e.time)
            prev = last_state.get(e.client_id)
            if prev and prev[0] == "uploading":
                client_phase["upload+verify"].append(e.time - prev[1])
        if e.type == "client.state":
            state = e.data.get("state", "")
            prev = last_state.get(e.client_id)
            if prev is not None:
                if prev[0] == "downloading" and state == "training":
                    client_phase["download"].append(e.time - prev[1])
                elif prev[0] == "training" and state == "uploading":
                    client_phase["train (fit)"].append(e.time - prev[1])
            last_state[e.client_id] = (state, e.time)
    rounds = []
    for number in sorted(k for k in per_round if k):
        r = per_round[number]
        if "started" not in r or "ended" not in r:
            continue
        rounds.append(
            {
                "round": number,
                "total_s": r["ended"] - r["started"],
                "until_last_update_s": r.get("last_update", r["started"]) - r["started"],
                "aggregate_s": r.get("evaluating", r["ended"]) - r.get("aggregating", r["ended"]),
                "evaluate_and_commit_s": r["ended"] - r.get("evaluating", r["ended"]),
            }
        )
    out["rounds"] = rounds
    out["client_phases_median_s"] = {k: statistics.median(v) for k, v in client_phase.items()}
    out["client_phases_first_round_s"] = {k: v[0] for k, v in client_phase.items() if v}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    imports = {name: time_import(code) for name, code in IMPORTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        doc, wall, launched = run_demo(args.rounds, args.clients, Path(tmp))
        detail = phases(Path(doc["state_dir"]), launched)
    final = doc["rounds"][-1]["metrics"]
    report = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": sys.version.split()[0]},
        "demo": {
            "rounds": args.rounds,
            "clients": args.clients,
            "wall_s": wall,
            "final_accuracy": final.get("accuracy"),
            "final_loss": final.get("loss"),
        },
        "imports_median_s": imports,
        "phases": detail,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"flctl demo: {args.clients} clients, {args.rounds} rounds: wall {wall:.1f} s, "
        f"final accuracy {final.get('accuracy'):.4f}"
    )
    print("\nimport / interpreter start (median of 3, separate processes):")
    for name, seconds in imports.items():
        print(f"  {name:<36} {seconds:6.2f} s")
    print(
        f"\ndemo launched -> coordinator listening:  {detail['coordinator_ready_s']:.2f} s"
        "  (init, certificates, coordinator process, torch, task, model v1)"
    )
    print(f"listening -> last client joined:         {detail['last_client_joined_s']:.2f} s")
    print(f"last client joined -> last round ended:  {detail['rounds_total_s']:.2f} s")
    print(f"peak RSS MiB: {doc.get('peak_rss_mib')}")
    print("\nclient phases (median over all rounds; first round in brackets):")
    for name, seconds in detail["client_phases_median_s"].items():
        first = detail["client_phases_first_round_s"].get(name, float("nan"))
        print(f"  {name:<16} {seconds:6.3f} s   [{first:.3f} s]")
    print("\nround  total   until-last-update  aggregate  evaluate+commit")
    for r in detail["rounds"]:
        print(
            f"{r['round']:5d}  {r['total_s']:5.2f}s  {r['until_last_update_s']:17.2f}s"
            f"  {r['aggregate_s']:8.3f}s  {r['evaluate_and_commit_s']:14.3f}s"
        )


if __name__ == "__main__":
    main()
