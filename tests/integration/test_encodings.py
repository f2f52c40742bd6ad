"""Clients that send float16 deltas complete a round with a real coordinator and real clients.

The committed model must be within the encoding's rounding of the one full float32 updates
give: each element is off by at most 2^-11 of the change the round made (docs/benchmarks.md),
far below the 1e-3 asserted here.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from flctl.coordinator import Coordinator
from flctl.core import Config
from flctl.store import BlobStore, SqlStore
from flctl.tensors import load_parameters, read_metadata, read_spec

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)


def _one_round(config: Config, encoding: str, dtype: str) -> None:
    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [
            make_runner(
                config,
                address,
                f"c{i}",
                partition=i - 1,
                update_encoding=encoding,
                update_dtype=dtype,
            )
            for i in (1, 2)
        ]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            reply = await client.start_round(1)

            async def done() -> bool:
                status = await client.status(list(reply.round_ids))
                return all(r.status in ("committed", "failed") for r in status.rounds)

            await wait_until(done, timeout=60.0, step=0.1)
            status = await client.status(list(reply.round_ids))
            assert [r.status for r in status.rounds] == ["committed"], status.rounds[0].reason
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def _head_and_updates(config: Config) -> tuple[dict[str, torch.Tensor], list[Path]]:
    store = SqlStore.open(config.state_path)
    blobs = BlobStore(config.state_path / "blobs")
    try:
        head = store.head()
        assert head is not None and head.version == 2
        accepted = store.updates_for_round(1, status="accepted")
        assert len(accepted) == 2
        return load_parameters(blobs.path(head.digest)), [blobs.path(u.digest) for u in accepted]
    finally:
        store.close()


def test_float16_deltas_commit_within_tolerance_of_full_float32(
    project: Project, tmp_path: Path
) -> None:
    # the reference federation: same task, seed and data, lossless updates
    reference = Project(tmp_path / "reference")
    reference.root.mkdir()
    shutil.copytree(project.root / "certs", reference.root / "certs")
    shutil.copy(project.root / "tiny_task.py", reference.root / "tiny_task.py")
    full_config = reference.write()
    _one_round(full_config, "full", "float32")
    full_model, full_updates = _head_and_updates(full_config)

    config = project.write()
    _one_round(config, "delta", "float16")
    model, updates = _head_and_updates(config)

    # what travelled were float16 deltas from the round's model
    for path in updates:
        assert read_metadata(path)["flctl.encoding"] == "delta"
        assert {s.dtype for s in read_spec(path).values()} == {"F16"}
    for path in full_updates:
        assert read_metadata(path) == {}
        assert {s.dtype for s in read_spec(path).values()} == {"F32"}

    def data_bytes(path: Path) -> int:  # the tensors' bytes (the tiny model's header dominates)
        return sum(s.end - s.begin for s in read_spec(path).values())

    assert [data_bytes(p) * 2 for p in updates] == [data_bytes(p) for p in full_updates]
    # the committed model is within rounding of the lossless one, in float32
    assert model.keys() == full_model.keys()
    for name, tensor in model.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, full_model[name], rtol=0, atol=1e-3)
