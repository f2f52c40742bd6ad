"""Transport compression: how much model data shrinks, how fast, and what "auto" decides.

The data is what flctl sends, as safetensors bytes cut into 1 MiB chunks (one zstd frame
each, checksummed, exactly as flctl.transport.compress_chunk writes them):

- f32 weights: the `large` template's model (~``--params`` float32 parameters, seeded init);
- f32 delta (SGD step): the same model after one step of the template's own ``fit`` minus
  the model before it (what a client uploading deltas sends);
- f32 delta (noise): the model plus N(0, 1e-3) noise, minus the model: a dense delta;
- bf16 / fp16 weights: the f32 weights cast down.

For each: size ratio (raw / compressed) and compress / decompress speed in MiB/s of raw bytes
(one thread; best and median of ``--repeat``) for zstd levels 1 and 3, with and without the
4-byte shuffle (codec "zstd-shuffle4"); then the codec the "auto" policy picks from the first
1 MiB at link rates of 750 MiB/s (loopback mTLS) and 50 MiB/s.

    python bench/compression.py [--params 25000000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
LINKS_MIB_S = (750, 50)


def datasets(params: int, seed: int) -> dict[str, bytes]:
    """The payloads, as safetensors bytes."""
    import torch

    from flctl.core import TaskContext, load_task
    from flctl.tensors import save_parameters

    task = load_task(REPO / "templates" / "large" / "task.py")
    context = TaskContext(role="client", seed=seed, config={"params": params, "depth": 8})
    torch.manual_seed(seed)
    model = task.build_model(context)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client = task.client_fn(context)
    trained, _, _ = client.fit({k: v.clone() for k, v in weights.items()}, {"lr": 1e-3})
    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, dict[str, torch.Tensor]] = {
        "f32 weights": weights,
        "f32 delta (SGD step)": {k: trained[k].detach() - weights[k] for k in weights},
        "f32 delta (noise)": {
            k: (w + torch.randn(w.shape, generator=gen) * 1e-3) - w for k, w in weights.items()
        },
        "bf16 weights": {k: w.to(torch.bfloat16) for k, w in weights.items()},
        "fp16 weights": {k: w.to(torch.float16) for k, w in weights.items()},
    }
    blobs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tensors in out.items():
            path = Path(tmp) / "blob.safetensors"
            save_parameters(tensors, path)
            blobs[name] = path.read_bytes()
    return blobs


def measure(data: bytes, codec: str, level: int, repeat: int) -> dict[str, Any]:
    """Ratio and speeds of ``codec`` at ``level`` over ``data`` in 1 MiB chunks."""
    from flctl.transport import compress_chunk, decompress_chunk

    chunks = [memoryview(data)[i : i + MiB] for i in range(0, len(data), MiB)]
    compress_s: list[float] = []
    decompress_s: list[float] = []
    frames: list[bytes] = []
    for _ in range(repeat):
        start = time.perf_counter()
        frames = [compress_chunk(c, level, codec=codec) for c in chunks]
        compress_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for frame, chunk in zip(frames, chunks, strict=True):
            decompress_chunk(frame, max_size=len(chunk), codec=codec)
        decompress_s.append(time.perf_counter() - start)
    mib = len(data) / MiB
    return {
        "codec": codec,
        "level": level,
        "ratio": len(data) / sum(map(len, frames)),
        "compress_mib_s_best": mib / min(compress_s),
        "compress_mib_s_median": mib / statistics.median(compress_s),
        "decompress_mib_s_best": mib / min(decompress_s),
        "decompress_mib_s_median": mib / statistics.median(decompress_s),
    }


def decide(data: bytes) -> dict[str, Any]:
    """What "auto" picks for ``data`` at each link rate, from its first 1 MiB."""
    from flctl.transport import SAMPLE_BYTES, choose_codec

    out: dict[str, Any] = {}
    for link in LINKS_MIB_S:
        decision = choose_codec("auto", data[:SAMPLE_BYTES], link_bytes_per_s=link * MiB)
        out[f"{link}"] = {
            "codec": decision.codec,
            "speedup": decision.speedup,
            "reason": decision.reason,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for name, data in datasets(args.params, args.seed).items():
        for codec in ("zstd", "zstd-shuffle4"):
            for level in (1, 3):
                rows.append(
                    {
                        "data": name,
                        "mib": len(data) / MiB,
                        **measure(data, codec, level, args.repeat),
                    }
                )
        rows.append({"data": name, "mib": len(data) / MiB, "auto": decide(data)})
        del data
    report = {"params": args.params, "repeat": args.repeat, "chunk_bytes": MiB, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.params:,} parameters, 1 MiB chunks, best / median of {args.repeat}, MiB/s")
    print(
        f"{'data':<22} {'MiB':>6} {'codec':<14} {'lvl':>3} {'ratio':>6} {'compress':>12} "
        f"{'decompress':>12}"
    )
    for row in rows:
        if "auto" in row:
            picks = ", ".join(f"{k} MiB/s: {v['codec']}" for k, v in row["auto"].items())
            print(f"{row['data']:<22} auto -> {picks}")
            continue
        print(
            f"{row['data']:<22} {row['mib']:>6.1f} {row['codec']:<14} {row['level']:>3} "
            f"{row['ratio']:>6.3f} {row['compress_mib_s_best']:>5.0f} / "
            f"{row['compress_mib_s_median']:<5.0f}"
            f"{row['decompress_mib_s_best']:>5.0f} / {row['decompress_mib_s_median']:<5.0f}"
        )


if __name__ == "__main__":
    main()
