"""The floor under a round's last-update-to-commit time: writing, hashing and syncing the model.

Whatever a strategy does, a round that commits writes its new model (safetensors, tensor by
tensor with flctl's TensorWriter), hashes it (the blob's name) and fsyncs it before the commit.
This times those three steps alone for a model of --params float32 parameters in --tensors
equal tensors, a few times, in a temporary folder (--dir: on the state folder's file system).

    .venv/bin/python bench/commit_floor.py --params 125000000 --repeat 3
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=125_000_000)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from flctl.tensors import TensorWriter, sha256_file

    torch.set_num_threads(1)
    width = int(math.sqrt(args.params / args.tensors))
    tensors = {f"t{i}": torch.randn(width, width) for i in range(args.tensors)}
    shapes = dict.fromkeys(tensors, ("F32", (width, width)))
    mib = sum(t.numel() * 4 for t in tensors.values()) / (1 << 20)
    print(f"model {mib:.1f} MiB ({args.tensors} tensors of {width} x {width} float32)")
    print("  write s  hash s  fsync s  total s")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for trial in range(args.repeat):
            out = Path(tmp) / f"model{trial}.safetensors"
            started = time.perf_counter()
            with TensorWriter(out, shapes) as writer:
                for name, tensor in tensors.items():
                    writer.write(name, tensor)
            written = time.perf_counter()
            sha256_file(out)
            hashed = time.perf_counter()
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            synced = time.perf_counter()
            print(
                f"  {written - started:7.2f}  {hashed - written:6.2f}  {synced - hashed:7.2f}"
                f"  {synced - started:7.2f}"
            )
            out.unlink()


if __name__ == "__main__":
    main()
