"""``flctl simulate`` on digits: wall time per round, engine overhead, memory of the whole tree.

Each run makes a fresh digits project (``flctl init``) and runs ``flctl simulate --json`` as a
subprocess, as a user would; while it runs, the resident memory of its whole process tree (the
simulate process, its workers, and with ``--backend ray`` every Ray process started for the
run) is sampled every 0.25 s from /proc, and the peak of the sum is reported.

    python bench/simulate.py run --clients 1000 --rounds 20 --per-round 100 [--workers 1]
    python bench/simulate.py memory --clients 100 1000 10000 [--rounds 3 --per-round 100]
        [--task synthetic|digits]   # synthetic (default): digits cannot be split 10,000 ways
    python bench/simulate.py compare [--clients 10 --rounds 5]   # simulate vs serve + join

``compare`` runs the same job twice from the same seed: ``flctl simulate`` and ``flctl demo``
(a coordinator and N client processes over mutual TLS), and prints both final digests and
accuracies. Add ``--json`` for one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FLCTL = [sys.executable, "-m", "flctl"]

#: ``memory``'s task: digits' 1,437 images cannot be split 10,000 ways, so each client draws
#: 32 synthetic examples of its own (from the seed and its partition) for a model of digits'
#: size; the engine's work per client is the same.
SYNTHETIC_TASK = """
import torch
from flctl.client import Client


def build_model(context):
    return torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )


def _data(seed, partition, n=32):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + partition)
    x = torch.randn(n, 64, generator=gen)
    return x, (x[:, :10].argmax(1))


class SyntheticClient(Client):
    def __init__(self, context):
        self.context = context
        self.model = build_model(context)
        self.x, self.y = _data(context.seed, context.partition_id)

    def get_parameters(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def fit(self, parameters, config):
        self.model.load_state_dict(parameters)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return self.get_parameters(), len(self.y), {"train_loss": float(loss)}


def client_fn(context):
    return SyntheticClient(context)


def server_evaluate(parameters, context):
    model = build_model(context)
    model.load_state_dict(parameters)
    x, y = _data(context.seed, 10**9, 512)
    with torch.no_grad():
        logits = model(x)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return loss, {"accuracy": float((logits.argmax(1) == y).float().mean()), "loss": loss}
"""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task.name}/children").read_text()
            out += [int(child) for child in text.split()]
    except OSError:
        pass
    return out


def _rss_of_tree(root: int) -> int:
    """Resident bytes of ``root`` and every descendant (Ray's processes included).

    Only the tree is read (``/proc/PID/task/TID/children``), not every process: the sampler
    must not take the CPU the run measures.
    """
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        todo += _children(pid)
    return total


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_of_tree(self.pid))
            time.sleep(0.25)


def _project(root: Path, seed: int) -> Path:
    subprocess.run([*FLCTL, "init", "proj", "--seed", str(seed)], cwd=root, check=True,
                   capture_output=True)  # fmt: skip
    return root / "proj"


def simulate(
    clients: int,
    rounds: int,
    per_round: int,
    workers: int,
    backend: str,
    seed: int = 0,
    task: str = "digits",
) -> dict[str, Any]:
    """One ``flctl simulate`` run in a fresh project; its report plus wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        proj = _project(Path(folder), seed)
        if task == "synthetic":
            (proj / "task.py").write_text(SYNTHETIC_TASK)
        args = [*FLCTL, "simulate", "--clients", str(clients), "--rounds", str(rounds),
                "--per-round", str(per_round), "--json", "--backend", backend]  # fmt: skip
        if workers:
            args += ["--workers", str(workers)]
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sampler = _Sampler(proc.pid)
        sampler.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"flctl simulate failed ({proc.returncode}): {err.decode()[-2000:]}")
        report: dict[str, Any] = json.loads(out)
    per_round_s = [r["seconds"] for r in report["rounds"]]
    overheads = [r["overhead_ms_per_client"] for r in report["rounds"][1:]]
    last = report["rounds"][-1]["metrics"]
    return {
        "task": task,
        "clients": clients,
        "rounds": rounds,
        "per_round": per_round,
        "workers": report["workers"],
        "backend": backend,
        "wall_s": round(wall, 2),
        "startup_s": report["startup_s"],
        "round_s_median": round(statistics.median(per_round_s), 3),
        "round_1_s": per_round_s[0],
        "overhead_ms_per_client_median": round(statistics.median(overheads), 2)
        if overheads
        else None,
        "final_accuracy": last.get("accuracy"),
        "peak_tree_rss_mib": round(sampler.peak / (1 << 20)),
        "head_digest": report["head_digest"],
    }


def _head(proj: Path) -> dict[str, Any]:
    out = subprocess.run([*FLCTL, "models", "ls", "--json"], cwd=proj, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    doc = json.loads(out)
    head = next(m for m in doc["models"] if m["version"] == doc["head"])
    return {"head_version": head["version"], "head_digest": head["digest"],
            "final_accuracy": (head.get("metrics") or {}).get("accuracy")}  # fmt: skip


def deploy(clients: int, rounds: int, seed: int) -> dict[str, Any]:
    """The job deployed: ``flctl serve`` and N ``flctl join`` processes over mutual TLS.

    The clients are named as the simulation names them (``sim-00000`` holds partition 0), so
    that the coordinator sums their updates in the same order.
    """
    with tempfile.TemporaryDirectory() as folder:
        proj = _project(Path(folder), seed)
        ids = [f"sim-{i:05d}" for i in range(clients)]
        toml = proj / "flctl.toml"
        # every round waits for all N clients (a deployed round starts with those connected)
        text = toml.read_text().replace("num_partitions = 3", f"num_partitions = {clients}")
        toml.write_text(text.replace("min_clients = 2", f"min_clients = {clients}"))
        subprocess.run([*FLCTL, "certs", "gen", *(a for i in ids for a in ("--client-id", i))],
                       cwd=proj, check=True, capture_output=True)  # fmt: skip
        logs = Path(folder) / "logs"
        logs.mkdir()
        procs: list[subprocess.Popen[bytes]] = []
        env = {**os.environ, "OMP_NUM_THREADS": "1"}

        def start(name: str, *args: str) -> None:
            with (logs / f"{name}.log").open("wb") as log:
                procs.append(subprocess.Popen([*FLCTL, *args], cwd=proj, stdout=log,
                                              stderr=subprocess.STDOUT, env=env))  # fmt: skip

        started = time.perf_counter()
        try:
            start("serve", "serve", "--address", "127.0.0.1:0", "--no-tui")
            serve_file = proj / ".flctl" / "serve.json"
            deadline = time.monotonic() + 120
            while not serve_file.exists():
                if time.monotonic() > deadline:
                    raise SystemExit((logs / "serve.log").read_text())
                time.sleep(0.2)
            address = json.loads(serve_file.read_text())["address"]
            for i, client in enumerate(ids):
                start(client, "join", "--client-id", client, "--server", address,
                      "--partition", str(i), "--num-partitions", str(clients), "--threads", "1")  # fmt: skip
            result = subprocess.run(
                [*FLCTL, "round", "start", "--rounds", str(rounds), "--wait", "--json"],
                cwd=proj, capture_output=True, text=True, check=True,
            )  # fmt: skip
            wall = time.perf_counter() - started
            statuses = [r["status"] for r in json.loads(result.stdout)["rounds"]]
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        return {"wall_s": round(wall, 2), "statuses": statuses, **_head(proj)}


def compare(clients: int, rounds: int, seed: int) -> dict[str, Any]:
    """The same job deployed (serve + join processes over mTLS) and simulated."""
    deployed = deploy(clients, rounds, seed)
    simulated = simulate(clients, rounds, 0, 1, "local", seed)
    return {
        "deployed": deployed,
        "simulated": simulated,
        "same_digest": deployed["head_digest"] == simulated["head_digest"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run")
    run.add_argument("--clients", type=int, default=1000)
    run.add_argument("--rounds", type=int, default=20)
    run.add_argument("--per-round", type=int, default=100)
    run.add_argument("--workers", type=int, default=0)
    run.add_argument("--backend", default="local")
    mem = sub.add_parser("memory")
    mem.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    mem.add_argument("--rounds", type=int, default=3)
    mem.add_argument("--per-round", type=int, default=100)
    mem.add_argument("--workers", type=int, default=0)
    mem.add_argument("--task", choices=["digits", "synthetic"], default="synthetic")
    cmp = sub.add_parser("compare")
    cmp.add_argument("--clients", type=int, default=10)
    cmp.add_argument("--rounds", type=int, default=5)
    cmp.add_argument("--seed", type=int, default=0)
    for p in (run, mem, cmp):
        p.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.mode == "run":
        rows = [simulate(args.clients, args.rounds, args.per_round, args.workers, args.backend)]
    elif args.mode == "memory":
        rows = [
            simulate(n, args.rounds, min(args.per_round, n), args.workers, "local", 0, args.task)
            for n in args.clients
        ]
    else:
        rows = [compare(args.clients, args.rounds, args.seed)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
