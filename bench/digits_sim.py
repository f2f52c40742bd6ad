"""Simulate FedAvg on the digits template in one process: no network, no coordinator.

Loads templates/digits/task.py with flctl's loader, starts from ``build_model`` under
``torch.manual_seed(seed)``, and runs N rounds in which every client fits the global model and
the new global model is the average of their parameters weighted by ``num_examples``. After
each round it prints the server-side test accuracy and how long each client's ``fit`` took.

The hyperparameters are the template's flctl.toml ``[task]`` table (so the two never diverge);
``--set key=value`` overrides one for tuning.

    .venv/bin/python bench/digits_sim.py --seed 0 1 2
    .venv/bin/python bench/digits_sim.py --partitioning dirichlet --alpha 0.5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "templates" / "digits"
sys.path.insert(0, str(ROOT))

from flctl.core import TaskContext, load_task  # noqa: E402


def template_task_config() -> dict[str, Any]:
    """The ``[task]`` table of the template's flctl.toml (placeholders filled with dummies)."""
    text = (TEMPLATE / "flctl.toml").read_text(encoding="utf-8")
    text = text.replace("{{ project_name }}", "sim").replace("{{ seed }}", "0")
    return dict(tomllib.loads(text)["task"])


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Average state dicts weighted by their example counts (non-float tensors: first one)."""
    total = sum(n for _, n in updates)
    out: dict[str, torch.Tensor] = {}
    for name, first in updates[0][0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for params, n in updates:
                acc += params[name].to(torch.float64) * (n / total)
            out[name] = acc.to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def simulate(
    *,
    seed: int,
    rounds: int,
    clients: int,
    partitioning: str,
    alpha: float,
    device: str,
    task_config: dict[str, Any],
    verbose: bool,
) -> dict[str, Any]:
    """Run one simulation; return its per-round record."""
    task = load_task(TEMPLATE / "task.py")

    def context(role: str, partition_id: int = 0) -> TaskContext:
        return TaskContext(
            role=role,
            seed=seed,
            device=device,
            client_id=f"c{partition_id + 1}" if role == "client" else "",
            partition_id=partition_id,
            num_partitions=clients,
            partitioning=partitioning,
            alpha=alpha,
            config=task_config,
        )

    server_ctx = context("coordinator")
    torch.manual_seed(seed)
    model = task.build_model(server_ctx)
    global_params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _, initial = task.server_evaluate(global_params, server_ctx)
    members = [task.client_fn(context("client", i)) for i in range(clients)]
    record: dict[str, Any] = {
        "seed": seed,
        "partitioning": partitioning,
        "alpha": alpha,
        "clients": clients,
        "task": task_config,
        "initial_accuracy": initial["accuracy"],
        "rounds": [],
    }
    if verbose:
        print(f"seed {seed} {partitioning} (alpha {alpha}): initial acc {initial['accuracy']:.4f}")
    start = time.perf_counter()
    for server_round in range(1, rounds + 1):
        config = {**task_config, "server_round": server_round}
        updates, fit_times, sizes = [], [], []
        for member in members:
            t0 = time.perf_counter()
            params, n, _metrics = member.fit(global_params, config)
            fit_times.append(time.perf_counter() - t0)
            updates.append((params, n))
            sizes.append(n)
        global_params = fedavg(updates)
        loss, metrics = task.server_evaluate(global_params, server_ctx)
        row = {
            "round": server_round,
            "accuracy": metrics["accuracy"],
            "loss": loss,
            "fit_s": fit_times,
            "elapsed_s": time.perf_counter() - start,
        }
        record["rounds"].append(row)
        if verbose:
            fits = " ".join(f"{t * 1000:.0f}" for t in fit_times)
            print(
                f"  round {server_round:2d}  acc {metrics['accuracy']:.4f}  loss {loss:.4f}  "
                f"fit ms [{fits}]  sizes {sizes}  elapsed {row['elapsed_s']:.2f}s"
            )
    all_fits = [t for row in record["rounds"] for t in row["fit_s"]]
    record["final_accuracy"] = record["rounds"][-1]["accuracy"] if rounds else initial["accuracy"]
    record["mean_fit_s"] = statistics.fmean(all_fits) if all_fits else 0.0
    record["max_fit_s"] = max(all_fits, default=0.0)
    record["total_s"] = time.perf_counter() - start
    if verbose:
        print(
            f"  final acc {record['final_accuracy']:.4f}  fit per client per round: "
            f"mean {record['mean_fit_s'] * 1000:.0f} ms, max {record['max_fit_s'] * 1000:.0f} ms"
            f"  total {record['total_s']:.2f}s"
        )
    return record


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    return key, tomllib.loads(f"v = {value}")["v"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--partitioning", choices=["iid", "dirichlet"], default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--set", type=parse_override, action="append", default=[], help="override task.KEY=VALUE"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    task_config = {**template_task_config(), **dict(args.set)}
    runs = [
        simulate(
            seed=seed,
            rounds=args.rounds,
            clients=args.clients,
            partitioning=args.partitioning,
            alpha=args.alpha,
            device=args.device,
            task_config=task_config,
            verbose=not args.json,
        )
        for seed in args.seed
    ]
    if args.json:
        print(json.dumps({"threads": args.threads, "runs": runs}, indent=2))
    elif len(runs) > 1:
        finals = ", ".join(f"seed {r['seed']}: {r['final_accuracy']:.4f}" for r in runs)
        print(f"final accuracy: {finals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
