"""FedAvg memory and time: flctl's streaming aggregation against loading every update.

For each model size and K, K update files are written once; each aggregation then runs in a
fresh process so that its peak RSS (VmHWM, which counts mapped file pages too) is its own:

- stream: flctl.aggregation.FedAvg (pread one tensor per update, one float64 accumulator,
  output written tensor by tensor);
- memory: load all K state dicts, average them (flctl.aggregation.fedavg_in_memory), save.

    python bench/aggregate.py [--sizes-mb 100 500] [--clients 2 4 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20


def child(mode: str, base: str, out: str, files: list[str]) -> None:
    import resource

    import torch

    from flctl.aggregation import FedAvg, WeightedUpdate, fedavg_in_memory
    from flctl.tensors import load_parameters, save_parameters

    torch.set_num_threads(1)
    start = time.perf_counter()
    if mode == "stream":
        updates = [WeightedUpdate(Path(f), 100 + i) for i, f in enumerate(files)]
        FedAvg().aggregate(Path(base), updates, Path(out))
    else:
        models = [load_parameters(Path(f)) for f in files]
        save_parameters(fedavg_in_memory(models, [100 + i for i in range(len(files))]), Path(out))
    seconds = time.perf_counter() - start
    peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss": peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def idle_rss() -> int:
    code = "import torch, flctl.aggregation, flctl.tensors; print(open('/proc/self/status').read())"
    text = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return next(
        int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmHWM:")
    )


def make_updates(folder: Path, size_mb: int, count: int) -> list[Path]:
    import torch

    from flctl.tensors import TensorWriter

    width = 2048
    rows = size_mb * MiB // (4 * width)
    layers = 5
    per = rows // layers
    specs = {f"layer{i}.weight": ("F32", (per, width)) for i in range(layers)}
    paths = []
    gen = torch.Generator().manual_seed(size_mb)
    for k in range(count + 1):
        path = folder / f"{size_mb}-{k}.safetensors"
        with TensorWriter(path, specs) as writer:
            for name in specs:
                writer.write(name, torch.randn(per, width, generator=gen))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.child[3:])
        return
    rows = []
    base_rss = idle_rss()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes_mb:
            files = make_updates(folder, size, max(args.clients))
            model_bytes = files[0].stat().st_size
            for k in args.clients:
                for mode in ("stream", "memory"):
                    out = folder / "out.safetensors"
                    result = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--child",
                            mode,
                            str(files[0]),
                            str(out),
                            *map(str, files[1 : k + 1]),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    figures = json.loads(result.stdout)
                    rows.append(
                        {
                            "model_mib": model_bytes / MiB,
                            "clients": k,
                            "mode": mode,
                            "seconds": figures["seconds"],
                            "peak_rss_mib": figures["peak_rss"] / MiB,
                            "peak_over_model": (figures["peak_rss"] - base_rss) / model_bytes,
                        }
                    )
                    out.unlink(missing_ok=True)
            for f in files:
                f.unlink()
    report = {"idle_rss_mib": base_rss / MiB, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"idle process (python + torch + flctl): {base_rss / MiB:.0f} MiB peak RSS")
    print("model MiB  K  mode     time s  peak RSS MiB  (peak - idle) / model")
    for r in rows:
        print(
            f"{r['model_mib']:9.0f} {r['clients']:2d}  {r['mode']:<7} {r['seconds']:7.2f}  {r['peak_rss_mib']:12.0f}  {r['peak_over_model']:6.2f}"
        )


if __name__ == "__main__":
    main()
