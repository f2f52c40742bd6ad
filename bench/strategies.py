"""The built-in strategies on digits (non-IID, under attack) and their aggregation cost.

Three benchmarks, one subcommand each:

- ``noniid``: digits, 10 clients, Dirichlet(alpha = 0.1) partitions, 30 rounds, several seeds:
  final and best server-side test accuracy per strategy configuration.
- ``attacks``: digits, 10 IID clients of which 2 are malicious (sign-flipped update x5,
  Gaussian noise of the update's norm, label flipping), 20 rounds: final accuracy per strategy.
- ``cost``: aggregation time and peak RSS of each strategy for K synthetic updates of a 100 MiB
  model (26M float32 parameters) on disk, one fresh process per measurement (the stateful
  strategies: their second round, holding the first round's state).

The federations are simulated in one process, as bench/digits_sim.py does: the digits
template's task.py (loaded with flctl's loader), its flctl.toml ``[task]`` table, and its
Dirichlet partitions. Each round goes through the coordinator's code path on files: the base
model and every client's update are safetensors files in a temporary folder, the weights are
``cap_weights`` of the claimed example counts, the strategy is built anew each round with
``make_strategy`` and given the previous round's ``state_dict`` (as after a commit), its
``configure_fit`` config is merged into each client's fit config (fedprox's ``proximal_mu``,
which the template's client turns into the proximal term), and ``Strategy.aggregate`` writes
the next model. The attacks are a bench-only wrapper around the template's client.

    .venv/bin/python bench/strategies.py noniid --seeds 0 1 2 --rounds 30
    .venv/bin/python bench/strategies.py attacks --seeds 0 1 2
    .venv/bin/python bench/strategies.py cost --k 2 8 32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "templates" / "digits"
sys.path.insert(0, str(ROOT))
MiB = 1 << 20

# name, strategy, [strategy] parameters. Flower-like defaults first, then a tuned value.
NONIID_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("fedavg", "fedavg", {}),
    ("fedprox mu=0.01", "fedprox", {"proximal_mu": 0.01}),
    ("fedprox mu=0.1", "fedprox", {"proximal_mu": 0.1}),
    ("fedavgm lr=1 m=0.9", "fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.9}),
    ("fedavgm lr=0.1 m=0.9", "fedavgm", {"server_learning_rate": 0.1, "server_momentum": 0.9}),
    ("fedadam eta=0.1 (default)", "fedadam", {}),
    ("fedadam eta=0.01", "fedadam", {"eta": 0.01}),
    ("fedyogi eta=0.01 (default)", "fedyogi", {}),
    ("fedyogi eta=0.03", "fedyogi", {"eta": 0.03}),
]

ATTACKS = ["none", "sign_flip", "noise", "label_flip"]


def robust_configs(clients: int, malicious: int) -> list[tuple[str, str, dict[str, Any], int]]:
    """(label, strategy, params, clients) for the attack benchmark."""
    f = malicious
    bulyan_clients = max(clients, 4 * f + 3)
    return [
        ("fedavg", "fedavg", {}, clients),
        # the coordinator's Byzantine detection in front of FedAvg (scores, outlier rule)
        ('fedavg exclude_outliers="drop"', "fedavg", {"exclude_outliers": "drop"}, clients),
        ("fedmedian", "fedmedian", {}, clients),
        ("fedtrimmedavg beta=0.2", "fedtrimmedavg", {"beta": 0.2}, clients),
        (f"krum f={f}", "krum", {"num_malicious": f}, clients),
        (
            f"multikrum f={f} m={clients - f}",
            "multikrum",
            {"num_malicious": f, "to_keep": clients - f},
            clients,
        ),
        (f"bulyan f={f} (n={bulyan_clients})", "bulyan", {"num_malicious": f}, bulyan_clients),
    ]


def template_task_config() -> dict[str, Any]:
    text = (TEMPLATE / "flctl.toml").read_text(encoding="utf-8")
    text = text.replace("{{ project_name }}", "sim").replace("{{ seed }}", "0")
    return dict(tomllib.loads(text)["task"])


# ---------------------------------------------------------------------------------------------
# Attacks (bench only: a wrapper around the template's client, never in flctl's client)
# ---------------------------------------------------------------------------------------------


class MaliciousClient:
    """Wraps an honest client; ``fit`` returns a poisoned model instead of the trained one."""

    def __init__(self, inner: Any, attack: str, seed: int) -> None:
        import torch

        self.inner = inner
        self.attack = attack
        self.generator = torch.Generator().manual_seed(seed)
        if attack == "label_flip":
            inner.y = 9 - inner.y  # trains honestly on flipped labels

    def fit(self, parameters: dict[str, Any], config: dict[str, Any]) -> tuple[Any, int, Any]:
        import torch

        base = {k: v.clone() for k, v in parameters.items()}
        trained, n, metrics = self.inner.fit(parameters, config)
        if self.attack == "sign_flip":
            out = {k: base[k] - 5.0 * (trained[k] - base[k]) for k in trained}
        elif self.attack == "noise":
            norm = torch.sqrt(sum(((trained[k] - base[k]) ** 2).sum() for k in trained))
            noise = {k: torch.randn(v.shape, generator=self.generator) for k, v in trained.items()}
            noise_norm = torch.sqrt(sum((v**2).sum() for v in noise.values()))
            out = {k: base[k] + noise[k] * (norm / noise_norm) for k in trained}
        else:
            out = trained
        return out, n, metrics


# ---------------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------------


def simulate(job: dict[str, Any]) -> dict[str, Any]:
    """Run one federation; return its accuracies per round."""
    import torch

    from flctl.aggregation import (
        RunningSum,
        WeightedUpdate,
        cap_weights,
        find_outliers,
        make_strategy,
    )
    from flctl.core import TaskContext, load_task
    from flctl.core.config import RoundsConfig
    from flctl.tensors import load_parameters, save_parameters

    torch.set_num_threads(1)
    seed, clients = job["seed"], job["clients"]
    task_config = template_task_config()
    task = load_task(TEMPLATE / "task.py")

    def context(role: str, partition_id: int = 0) -> TaskContext:
        return TaskContext(
            role=role,
            seed=seed,
            device="cpu",
            client_id=f"c{partition_id + 1}" if role == "client" else "",
            partition_id=partition_id,
            num_partitions=clients,
            partitioning=job["partitioning"],
            alpha=job["alpha"],
            config=task_config,
        )

    server_ctx = context("coordinator")
    torch.manual_seed(seed)
    model = task.build_model(server_ctx)
    global_params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    members: list[Any] = [task.client_fn(context("client", i)) for i in range(clients)]
    for i in range(job.get("malicious", 0)):
        members[i] = MaliciousClient(members[i], job["attack"], seed * 100 + i)
    ids = [f"c{i + 1}" for i in range(clients)]
    rounds_cfg = RoundsConfig()
    accuracies: list[float] = []
    state: dict[str, Any] = {}
    start = time.perf_counter()
    agg_seconds = 0.0
    error = ""
    dropped: list[list[str]] = []  # per round, the clients exclude_outliers="drop" left out
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = folder / "base.safetensors"
        out = folder / "out.safetensors"
        for server_round in range(1, job["rounds"] + 1):
            params = dict(job["params"])
            exclude = params.pop("exclude_outliers", "off")
            strategy = make_strategy(job["strategy"], params)
            strategy.load_state_dict(state)
            extra = strategy.configure_fit(server_round, ids)
            save_parameters(global_params, base)
            paths, claims = [], []
            for cid, member in zip(ids, members, strict=True):
                config = {**task_config, "server_round": server_round, **extra.get(cid, {})}
                try:
                    params, n, _ = member.fit(dict(global_params), config)
                except ValueError as exc:  # the template refuses to train a NaN model
                    error = f"diverged in round {server_round}: {exc}"
                    break
                path = folder / f"{cid}.safetensors"
                save_parameters(params, path)
                paths.append(path)
                claims.append(n)
            if error:
                break
            weights = cap_weights(
                claims,
                max_examples=rounds_cfg.max_examples_per_update,
                max_share=rounds_cfg.max_weight_share,
            )
            updates = [
                WeightedUpdate(p, w, cid) for p, w, cid in zip(paths, weights, ids, strict=True)
            ]
            t0 = time.perf_counter()
            if exclude == "drop":
                # as the coordinator does: each update scored as it arrives (here in client
                # order, the attackers first: the worst case for the cosine), the rule, then
                # the aggregate of the others, their weights capped again
                running = RunningSum(base, folder, keep_sum=False)
                scores = {u.client_id: running.score(u) for u in updates}
                running.close()
                outliers = find_outliers(scores)
                kept = [i for i, cid in enumerate(ids) if cid not in outliers]
                weights = cap_weights(
                    [claims[i] for i in kept],
                    max_examples=rounds_cfg.max_examples_per_update,
                    max_share=rounds_cfg.max_weight_share,
                )
                updates = [
                    WeightedUpdate(paths[i], w, ids[i]) for i, w in zip(kept, weights, strict=True)
                ]
                dropped.append(sorted(outliers))
            try:
                strategy.aggregate(base, updates, out)
            except Exception as exc:  # a refusal (bulyan with too few updates) is a result
                error = f"{type(exc).__name__}: {exc}"
                break
            agg_seconds += time.perf_counter() - t0
            state = {k: v.clone() for k, v in strategy.state_dict().items()}
            global_params = load_parameters(out)
            _, metrics = task.server_evaluate(global_params, server_ctx)
            acc = float(metrics["accuracy"])
            if acc != acc:  # NaN: the model diverged
                acc = 0.0
            accuracies.append(acc)
    return {
        **{k: v for k, v in job.items() if k != "params"},
        "params": job["params"],
        "accuracy": accuracies,
        "final": accuracies[-1] if accuracies and not error else None,
        "best": max(accuracies) if accuracies else None,
        "error": error,
        "seconds": time.perf_counter() - start,
        "aggregate_seconds": agg_seconds,
        "dropped": dropped,
    }


def run_jobs(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [simulate(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(simulate, jobs, chunksize=1)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def cmd_noniid(args: argparse.Namespace) -> dict[str, Any]:
    configs = [c for c in NONIID_CONFIGS if not args.only or c[1] in args.only]
    jobs = [
        {
            "label": label,
            "strategy": name,
            "params": params,
            "seed": seed,
            "clients": args.clients,
            "rounds": args.rounds,
            "partitioning": "dirichlet",
            "alpha": args.alpha,
        }
        for label, name, params in configs
        for seed in args.seeds
    ]
    results = run_jobs(jobs, args.jobs)
    rows = []
    for label, name, params in configs:
        runs = [r for r in results if r["label"] == label]
        finals = [r["final"] for r in runs if r["final"] is not None]
        bests = [r["best"] for r in runs if r["best"] is not None]
        rows.append(
            {
                "label": label,
                "strategy": name,
                "params": params,
                "final": finals,
                "best": bests,
                "final_mean": statistics.fmean(finals) if finals else None,
                "best_mean": statistics.fmean(bests) if bests else None,
                "errors": [r["error"] for r in runs if r["error"]],
                "seconds": sum(r["seconds"] for r in runs),
            }
        )
    if not args.json:
        print(
            f"digits, {args.clients} clients, Dirichlet alpha {args.alpha}, {args.rounds} rounds, seeds {args.seeds}"
        )
        print(
            "| strategy | final acc (mean) | final per seed | best acc (mean) | best per seed | final >= 0.95, every seed |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            reach = "yes" if r["final"] and min(r["final"]) >= 0.95 else "no"
            print(
                f"| {r['label']} | {fmt(r['final_mean'])} | {' / '.join(map(fmt, r['final']))} | "
                f"{fmt(r['best_mean'])} | {' / '.join(map(fmt, r['best']))} | {reach} |"
                + (f" {r['errors'][0]}" if r["errors"] else "")
            )
    return {"benchmark": "noniid", "args": vars(args), "rows": rows, "runs": results}


def cmd_attacks(args: argparse.Namespace) -> dict[str, Any]:
    configs = [
        c
        for c in robust_configs(args.clients, args.malicious)
        if not args.only or c[1] in args.only
    ]
    jobs = [
        {
            "label": label,
            "strategy": name,
            "params": params,
            "seed": seed,
            "clients": n,
            "rounds": args.rounds,
            "partitioning": args.partitioning,
            "alpha": args.alpha,
            "attack": attack,
            "malicious": 0 if attack == "none" else args.malicious,
        }
        for label, name, params, n in configs
        for attack in args.attacks
        for seed in args.seeds
    ]
    results = run_jobs(jobs, args.jobs)
    table: dict[str, dict[str, list[float | None]]] = {}
    for r in results:
        table.setdefault(r["label"], {}).setdefault(r["attack"], []).append(r["final"])
    if not args.json:
        print(
            f"digits, {args.clients} clients ({args.malicious} malicious), {args.partitioning}, "
            f"{args.rounds} rounds, seeds {args.seeds}: final accuracy"
        )
        print("| strategy | " + " | ".join(args.attacks) + " |")
        print("|---" * (len(args.attacks) + 1) + "|")
        for label, _, _, _ in configs:
            cells = []
            for attack in args.attacks:
                vals = table.get(label, {}).get(attack, [])
                good = [v for v in vals if v is not None]
                cell = fmt(statistics.fmean(good)) if good else ""
                failed = [
                    r["error"].split(":")[0]
                    for r in results
                    if r["label"] == label and r["attack"] == attack and r["error"]
                ]
                if failed:
                    cell = (cell + " " if cell else "") + f"({len(failed)} {failed[0]})"
                cells.append(cell)
            print(f"| {label} | " + " | ".join(cells) + " |")
        for r in results:
            if r["error"]:
                print(f"{r['label']} / {r['attack']}: {r['error']}")
    return {"benchmark": "attacks", "args": vars(args), "table": table, "runs": results}


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------

#: Strategies that keep state between rounds: their cost is measured on the second round.
STATEFUL = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}

COST_PARAMS: dict[str, dict[str, Any]] = {
    "fedavgm": {"server_momentum": 0.9},
    "fedprox": {"proximal_mu": 0.01},
}


def cost_child(name: str, params_json: str, base: str, out: str, files: list[str]) -> None:
    import resource

    import torch

    from flctl.aggregation import WeightedUpdate, make_strategy

    torch.set_num_threads(1)
    strategy = make_strategy(name, json.loads(params_json))
    updates = [WeightedUpdate(Path(f), 100 + i, f"c{i}") for i, f in enumerate(files)]
    rounds = 1
    if name in STATEFUL:
        # Measure the second round, the steady state: the first one's optimizer state is held
        # while the next is computed. clear_refs resets VmHWM to the current RSS.
        strategy.aggregate(Path(base), updates, Path(out))
        Path(out).unlink()
        Path("/proc/self/clear_refs").write_text("5")
        rounds = 2
    start = time.perf_counter()
    error = ""
    try:
        strategy.aggregate(Path(base), updates, Path(out))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text().splitlines()

    def field(key: str) -> int:
        return next((int(x.split()[1]) * 1024 for x in status if x.startswith(key)), 0)

    peak = field("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "error": error, "round": rounds}))


def idle_rss() -> int:
    code = "import torch, flctl.aggregation, flctl.tensors; print(open('/proc/self/status').read())"
    text = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return next(int(x.split()[1]) * 1024 for x in text.splitlines() if x.startswith("VmHWM:"))


def cost_params(name: str, k: int) -> dict[str, Any]:
    params = dict(COST_PARAMS.get(name, {}))
    if name == "multikrum":
        params["to_keep"] = max(1, k - 2)
    return params


def cmd_cost(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from aggregate import make_updates  # bench/aggregate.py: 5 x (2560 x 2048) float32

    from flctl.aggregation import BUILTIN_STRATEGIES

    names = args.only or list(BUILTIN_STRATEGIES)
    rows = []
    base_rss = idle_rss()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        files = make_updates(folder, args.size_mb, max(args.k))
        write_s = time.perf_counter() - t0
        model_bytes = files[0].stat().st_size
        for name in names:
            for k in args.k:
                out = folder / "out.safetensors"
                params = cost_params(name, k)
                try:
                    result = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "cost-child",
                            name,
                            json.dumps(params),
                            str(files[0]),
                            str(out),
                            *map(str, files[1 : k + 1]),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=args.timeout,
                    )
                except subprocess.TimeoutExpired:
                    result = None
                if result is None:
                    figures = {
                        "seconds": None,
                        "peak_rss": 0,
                        "error": f"timeout after {args.timeout:g} s",
                    }
                elif result.returncode != 0:
                    figures = {"seconds": None, "peak_rss": 0, "error": result.stderr[-300:]}
                else:
                    figures = json.loads(result.stdout)
                row = {
                    "strategy": name,
                    "params": params,
                    "k": k,
                    "seconds": figures["seconds"],
                    "peak_rss_mib": figures["peak_rss"] / MiB,
                    "peak_over_model": (figures["peak_rss"] - base_rss) / model_bytes,
                    "error": figures["error"],
                }
                rows.append(row)
                if not args.json:
                    print(json.dumps(row), file=sys.stderr, flush=True)
                out.unlink(missing_ok=True)
    report = {
        "benchmark": "cost",
        "idle_rss_mib": base_rss / MiB,
        "model_mib": model_bytes / MiB,
        "write_seconds": write_s,
        "rows": rows,
    }
    if not args.json:
        print(
            f"model {model_bytes / MiB:.0f} MiB (5 float32 tensors of {model_bytes / 5 / MiB:.0f} MiB); idle process "
            f"(python + torch + flctl) {base_rss / MiB:.0f} MiB peak RSS"
        )
        ks = args.k
        print(
            "| strategy | "
            + " | ".join(f"K={k} time s" for k in ks)
            + " | "
            + " | ".join(f"K={k} peak RSS MiB" for k in ks)
            + " |"
        )
        print("|---" * (2 * len(ks) + 1) + "|")
        for name in names:
            mine = {r["k"]: r for r in rows if r["strategy"] == name}
            times = [
                (
                    mine[k]["error"].split(" ")[0]
                    if mine[k]["error"].startswith("timeout")
                    else "refused"
                )
                if mine[k]["error"]
                else f"{mine[k]['seconds']:.2f}"
                for k in ks
            ]
            peaks = ["-" if mine[k]["error"] else f"{mine[k]['peak_rss_mib']:.0f}" for k in ks]
            label = name + "".join(
                f" {key}={val}" for key, val in COST_PARAMS.get(name, {}).items()
            )
            print(f"| {label} | " + " | ".join(times) + " | " + " | ".join(peaks) + " |")
        for r in rows:
            if r["error"]:
                print(f"{r['strategy']} K={r['k']}: {r['error'].strip().splitlines()[-1]}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("noniid", help="non-IID digits: accuracy per strategy")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--only", nargs="+", help="strategy names to run (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1 torch thread each)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("attacks", help="2 malicious clients: accuracy per strategy and attack")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--malicious", type=int, default=2)
    p.add_argument("--partitioning", choices=["iid", "dirichlet"], default="iid")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=ATTACKS)
    p.add_argument("--only", nargs="+", help="strategy names to run (default: all)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cost", help="aggregation time and peak RSS per strategy and K")
    p.add_argument("--size-mb", type=int, default=100)
    p.add_argument("--k", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--only", nargs="+", help="strategy names to run (default: all)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement")
    p.add_argument("--tmp", default=None, help="folder for the update files")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cost-child")
    p.add_argument("name")
    p.add_argument("params")
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("files", nargs="+")

    args = parser.parse_args()
    if args.command == "cost-child":
        cost_child(args.name, args.params, args.base, args.out, args.files)
        return
    report = {"noniid": cmd_noniid, "attacks": cmd_attacks, "cost": cmd_cost}[args.command](args)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
