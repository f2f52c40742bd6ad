"""Update encodings: bytes per update against accuracy and reconstruction error.

For each of full/delta x float32/float16/bfloat16 (``client.update_encoding`` and
``client.update_dtype``):

- digits: the FedAvg simulation of bench/digits_sim.py (the digits template, 3 IID clients,
  10 rounds, seed 0), except that each client's trained model is written with
  ``flctl.tensors.encode_update`` and the round's model is flctl's streaming ``FedAvg`` over
  those files (which rebuilds each update with ``UpdateReader``): bytes per update and final
  test accuracy;
- large: the large template (``--large-params``, default 25M float32 parameters), one client's
  one local step from the seeded initial model: bytes per update, the largest absolute error
  of the rebuilt weights, the largest absolute change the step made, and the L2 error relative
  to the change (``||p' - p|| / ||p - b||``).

    python bench/encoding.py            # a table
    python bench/encoding.py --json     # one JSON document
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from digits_sim import template_task_config  # noqa: E402

from flctl.aggregation import FedAvg, WeightedUpdate  # noqa: E402
from flctl.core import TaskContext, load_task  # noqa: E402
from flctl.tensors import (  # noqa: E402
    TensorReader,
    UpdateReader,
    encode_update,
    load_parameters,
    save_parameters,
    sha256_file,
)

COMBINATIONS = [(e, d) for e in ("full", "delta") for d in ("float32", "float16", "bfloat16")]


def digits(encoding: str, dtype: str, *, seed: int, rounds: int, clients: int) -> dict[str, Any]:
    """Run the digits simulation with every update passing through the encoding."""
    task = load_task(ROOT / "templates" / "digits" / "task.py")
    task_config = template_task_config()

    def context(role: str, partition_id: int = 0) -> TaskContext:
        return TaskContext(
            role=role,
            seed=seed,
            device="cpu",
            client_id=f"c{partition_id + 1}" if role == "client" else "",
            partition_id=partition_id,
            num_partitions=clients,
            partitioning="iid",
            alpha=0.5,
            config=task_config,
        )

    server = context("coordinator")
    torch.manual_seed(seed)
    model = task.build_model(server)
    global_params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    members = [task.client_fn(context("client", i)) for i in range(clients)]
    sizes: list[int] = []
    accuracy = math.nan
    with tempfile.TemporaryDirectory(prefix="flctl-enc-") as tmp:
        folder = Path(tmp)
        for server_round in range(1, rounds + 1):
            base = folder / f"base-{server_round}"
            save_parameters(global_params, base)
            digest = sha256_file(base)
            updates = []
            config = {**task_config, "server_round": server_round}
            for i, member in enumerate(members):
                params, n, _ = member.fit(global_params, config)
                path = folder / f"u{server_round}-{i}"
                encode_update(
                    base, params, path, encoding=encoding, dtype=dtype, base_digest=digest
                )
                sizes.append(path.stat().st_size)
                updates.append(WeightedUpdate(path, n, f"c{i + 1}"))
            FedAvg().aggregate(base, updates, folder / "out")
            global_params = load_parameters(folder / "out")
            _, metrics = task.server_evaluate(global_params, server)
            accuracy = metrics["accuracy"]
    return {
        "encoding": encoding,
        "dtype": dtype,
        "bytes_per_update": round(sum(sizes) / len(sizes)),
        "final_accuracy": accuracy,
    }


def large_trained(params: int, seed: int, folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The large template's seeded model (saved) and one client's model after its step."""
    task = load_task(ROOT / "templates" / "large" / "task.py")
    config: dict[str, bool | int | float | str] = {
        "params": params,
        "depth": 8,
        "batch_size": 2,
        "lr": 0.001,
    }
    context = TaskContext(role="client", seed=seed, device="cpu", config=config)
    torch.manual_seed(seed)
    model = task.build_model(context)
    base = folder / "base"
    save_parameters(model.state_dict(), base)
    del model
    client = task.client_fn(context)
    trained, _, _ = client.fit(load_parameters(base), {**config, "server_round": 1})
    return base, {k: v.detach() for k, v in trained.items()}


def large(
    base: Path, trained: dict[str, torch.Tensor], encoding: str, dtype: str, folder: Path
) -> dict[str, Any]:
    """Encode one large update, rebuild it tensor by tensor, measure the error."""
    path = folder / "update"
    start = time.perf_counter()
    encode_update(base, trained, path, encoding=encoding, dtype=dtype)
    encode_s = time.perf_counter() - start
    max_error = max_change = 0.0
    sq_error = sq_change = 0.0
    with TensorReader(base) as reader, UpdateReader(path, reader) as update:
        for name, p in trained.items():
            p64 = p.double()
            # rebuilt in float32, as FedAvg does
            error = update.read(name).double() - p64
            change = p64 - reader.read(name).double()
            max_error = max(max_error, float(error.abs().max()))
            max_change = max(max_change, float(change.abs().max()))
            sq_error += float(error.square().sum())
            sq_change += float(change.square().sum())
            del error, change, p64
    size = path.stat().st_size
    path.unlink()
    return {
        "encoding": encoding,
        "dtype": dtype,
        "bytes_per_update": size,
        "max_abs_error": max_error,
        "max_abs_change": max_change,
        "relative_l2_error": math.sqrt(sq_error / sq_change) if sq_change else 0.0,
        "encode_s": encode_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--large-params", type=int, default=25_000_000)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    digit_rows = [
        digits(e, d, seed=args.seed, rounds=args.rounds, clients=args.clients)
        for e, d in COMBINATIONS
    ]
    with tempfile.TemporaryDirectory(prefix="flctl-enc-large-") as tmp:
        folder = Path(tmp)
        base, trained = large_trained(args.large_params, args.seed, folder)
        params = sum(t.numel() for t in trained.values())
        large_rows = [large(base, trained, e, d, folder) for e, d in COMBINATIONS]
    document = {
        "threads": args.threads,
        "digits": {
            "seed": args.seed,
            "rounds": args.rounds,
            "clients": args.clients,
            "rows": digit_rows,
        },
        "large": {"params": params, "seed": args.seed, "rows": large_rows},
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"digits: {args.clients} clients, {args.rounds} rounds, seed {args.seed}; "
        f"large: {params:,} parameters, one local step"
    )
    print(
        f"{'encoding':8} {'dtype':9} | {'digits B/update':>15} {'accuracy':>8} | "
        f"{'large B/update':>14} {'max |err|':>9} {'max |chg|':>9} {'rel. L2':>8}"
    )
    for d, big in zip(digit_rows, large_rows, strict=True):
        print(
            f"{d['encoding']:8} {d['dtype']:9} | {d['bytes_per_update']:>15,} "
            f"{d['final_accuracy']:>8.4f} | {big['bytes_per_update']:>14,} "
            f"{big['max_abs_error']:>9.2e} {big['max_abs_change']:>9.2e} "
            f"{big['relative_l2_error']:>8.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
