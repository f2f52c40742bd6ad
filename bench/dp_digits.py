"""Accuracy against epsilon: DP-FedAvg on the digits template, simulated in one process.

The digits training set (1,437 images) is split IID into ``--clients`` clients (100 by default,
about 14 images each), a population large enough for client-level DP to mean something. Each
round samples clients with Poisson sampling at ``--sampling-rate``; every sampled client fits
the global model (the template's ``fit``, its ``[task]`` table) and the round's model is made by
flctl's own aggregation, on files, exactly as the coordinator makes it:

- ``no DP``: flctl's ``FedAvg`` (weighted by ``num_examples``) over the sampled clients;
- ``clip only``: flctl's ``DpFedAvg`` with noise multiplier 0 (the clipping and the fixed
  denominator alone, no privacy);
- ``central z``: ``DpFedAvg`` with noise multiplier ``z``, denominator
  ``sampling_rate * clients``, noise from ``flctl.privacy.secure_generator`` (OS-seeded);
- ``adaptive z`` (``--adaptive Z...``): the same with adaptive clipping (flctl.privacy's
  ``AdaptiveClipping``: the noised count of unclipped updates moves the clip norm towards
  ``--target-quantile``; the noise multiplier charged stays ``z``);
- ``local z`` (``--local Z...``): each client clips and noises its own delta
  (``flctl.privacy.privatize_update``); ``LocalDpFedAvg`` averages them.

Epsilon is dp-accounting's, through ``flctl.privacy``, at ``--delta``: for central DP the sampled
Gaussian mechanism composed over the rounds (RDP and PLD); for local DP the per-client guarantee
flctl's ledger reports (docs/privacy.md: a Gaussian release of sensitivity 2C per round, no
amplification by sampling). ``--seed`` seeds the data split, the initial model, the training
shuffles and the simulated sampling; the DP noise is never seeded, so repeated runs differ by
the noise (``--repeats`` reports each run).

    .venv/bin/python bench/dp_digits.py                       # a table
    .venv/bin/python bench/dp_digits.py --json                # one JSON document
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from digits_sim import parse_override, template_task_config  # noqa: E402

from flctl.aggregation import (  # noqa: E402
    DpFedAvg,
    FedAvg,
    LocalDpFedAvg,
    Strategy,
    WeightedUpdate,
)
from flctl.core import TaskContext, load_task  # noqa: E402
from flctl.privacy import (  # noqa: E402
    Accountant,
    AdaptiveClipping,
    epsilon,
    local_round,
    privatize_update,
)
from flctl.tensors import load_parameters, save_parameters, sha256_file  # noqa: E402

TEMPLATE = ROOT / "templates" / "digits"


def run(
    kind: str,
    z: float,
    *,
    args: argparse.Namespace,
    task_config: dict[str, Any],
    workdir: Path,
) -> dict[str, Any]:
    """One simulated job; return its final accuracy and the epsilon it spent."""
    task = load_task(TEMPLATE / "task.py")

    def context(role: str, partition_id: int = 0) -> TaskContext:
        return TaskContext(
            role=role,
            seed=args.seed,
            device="cpu",
            client_id=f"c{partition_id + 1}" if role == "client" else "",
            partition_id=partition_id,
            num_partitions=args.clients,
            config=task_config,
        )

    server_ctx = context("coordinator")
    torch.manual_seed(args.seed)
    model = task.build_model(server_ctx)
    base = workdir / "model.safetensors"
    save_parameters({k: v.detach().clone() for k, v in model.state_dict().items()}, base)
    members = [task.client_fn(context("client", i)) for i in range(args.clients)]
    sampler = random.Random(args.seed)  # simulated sampling, reproducible; never the DP noise
    denominator = args.sampling_rate * args.clients
    adaptive = (
        AdaptiveClipping(
            target_quantile=args.target_quantile,
            learning_rate=args.clip_learning_rate,
            count_stddev=args.count_stddev or denominator / 20,
        )
        if kind == "adaptive"
        else None
    )
    clip_norm = args.clip
    clips: list[float] = []
    norms: list[float] = []
    started = time.perf_counter()
    accuracy = 0.0
    rounds_done = 0
    diverged_at: int | None = None
    for server_round in range(1, args.rounds + 1):
        config = {**task_config, "server_round": server_round}
        chosen = [i for i in range(args.clients) if sampler.random() < args.sampling_rate]
        if not chosen:  # an empty Poisson sample is still a round of the mechanism
            rounds_done += 1
            continue
        global_params = load_parameters(base)
        base_digest = sha256_file(base)
        updates = []
        for i in chosen:
            try:
                params, n, _ = members[i].fit(
                    {k: v.clone() for k, v in global_params.items()}, config
                )
            except ValueError:  # the template's "training diverged": the noise wrecked the model
                diverged_at = server_round
                break
            path = workdir / f"u{i}.safetensors"
            if kind == "local":
                release = privatize_update(
                    base,
                    params,
                    path,
                    clip_norm=clip_norm,
                    noise_multiplier=z,
                    base_digest=base_digest,
                )
                norms.append(release.norm)
            else:
                save_parameters(params, path)
            updates.append(WeightedUpdate(path, n, f"c{i + 1}"))
        if diverged_at is not None:
            _, metrics = task.server_evaluate(global_params, server_ctx)
            accuracy = float(metrics["accuracy"])
            break
        strategy: Strategy
        if kind == "fedavg":
            strategy = FedAvg()
        elif kind == "local":
            strategy = LocalDpFedAvg()
        else:
            update_z = z if adaptive is None else adaptive.update_noise_multiplier(z)
            strategy = DpFedAvg(
                clip_norm,
                update_z,
                denominator,
                adaptive=adaptive,
            )
        out = workdir / "next.safetensors"
        strategy.aggregate(base, updates, out)
        out.replace(base)
        rounds_done += 1
        if isinstance(strategy, DpFedAvg):
            norms.extend(strategy.last_norms)
            clips.append(clip_norm)
            if adaptive is not None and strategy.last_unclipped_fraction is not None:
                clip_norm = adaptive.next_clip_norm(clip_norm, strategy.last_unclipped_fraction)
        _, metrics = task.server_evaluate(load_parameters(base), server_ctx)
        accuracy = float(metrics["accuracy"])
        if args.verbose:
            print(
                f"    {kind} z={z:g} round {server_round:2d}: acc {accuracy:.4f} C={clip_norm:.3g}"
            )
    record: dict[str, Any] = {
        "kind": kind,
        "noise_multiplier": z,
        "final_accuracy": accuracy,
        "rounds_done": rounds_done,
        "diverged_at_round": diverged_at,
        "median_update_norm": statistics.median(norms) if norms else None,
        "final_clip_norm": clip_norm if kind != "fedavg" else None,
        "seconds": time.perf_counter() - started,
    }
    record.update(_epsilons(kind, z, rounds_done, args))
    return record


def _epsilons(
    kind: str, z: float, rounds: int, args: argparse.Namespace
) -> dict[str, float | None]:
    """Epsilon after ``rounds`` rounds (a round whose sampled clients all sat out counts too)."""
    if kind in ("fedavg", "clip") or z == 0:
        return {"epsilon_rdp": None, "epsilon_pld": None}
    if kind == "local":
        acc = Accountant(args.delta, [local_round(z)] * rounds)
        return {"epsilon_rdp": acc.epsilon("rdp"), "epsilon_pld": acc.epsilon("pld")}
    q = args.sampling_rate
    return {
        "epsilon_rdp": epsilon(z, rounds, args.delta, sampling_rate=q),
        "epsilon_pld": epsilon(z, rounds, args.delta, sampling_rate=q, accountant="pld"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--sampling-rate", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clip", type=float, default=1.0, help="clip norm (adaptive: start)")
    parser.add_argument(
        "--noise", type=float, nargs="+", default=[0.7, 1.0, 1.5, 2.0, 3.0], help="central z values"
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--adaptive", type=float, nargs="*", default=[], help="adaptive-clipping z values"
    )
    parser.add_argument("--target-quantile", type=float, default=0.5)
    parser.add_argument("--clip-learning-rate", type=float, default=0.2)
    parser.add_argument("--count-stddev", type=float, default=0.0, help="0: expected / 20")
    parser.add_argument("--local", type=float, nargs="*", default=[], help="local-DP z values")
    parser.add_argument("--repeats", type=int, default=1, help="runs per DP setting")
    parser.add_argument(
        "--set", type=parse_override, action="append", default=[], help="override task.KEY=VALUE"
    )
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    task_config = {**template_task_config(), **dict(args.set)}
    plan: list[tuple[str, float]] = [("fedavg", 0.0), ("clip", 0.0)]
    plan += [("central", z) for z in args.noise]
    plan += [("adaptive", z) for z in args.adaptive]
    plan += [("local", z) for z in args.local]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, z in plan:
            repeats = 1 if kind in ("fedavg", "clip") else args.repeats
            for _ in range(repeats):
                result = run(kind, z, args=args, task_config=task_config, workdir=Path(tmp))
                results.append(result)
                _print_row(result, sys.stderr if args.json else sys.stdout)
    document = {
        "clients": args.clients,
        "sampling_rate": args.sampling_rate,
        "rounds": args.rounds,
        "clip_norm": args.clip,
        "delta": args.delta,
        "seed": args.seed,
        "task": task_config,
        "results": results,
    }
    if args.json:
        print(json.dumps(document, indent=2))
    return 0


def _print_row(r: dict[str, Any], file: Any) -> None:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    label = {"fedavg": "no DP", "clip": "clip only"}.get(
        r["kind"], f"{r['kind']} z={r['noise_multiplier']:g}"
    )
    print(
        f"{label:18s} acc {r['final_accuracy']:.4f}  eps rdp {fmt(r['epsilon_rdp']):>7s}  "
        f"pld {fmt(r['epsilon_pld']):>7s}  median norm {fmt(r['median_update_norm'])}  "
        f"clip {fmt(r['final_clip_norm'])}  {r['seconds']:.1f}s"
        + (f"  diverged in round {r['diverged_at_round']}" if r["diverged_at_round"] else ""),
        file=file,
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
