"""RoundStream: a round's FedAvg summed while its updates upload, used only if it is the round's.

Real files in a real blob store, real worker threads; the uploads are files written by the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from flctl.aggregation import FedAvg, WeightedUpdate, cap_weights
from flctl.coordinator._streaming import RoundStream
from flctl.store import BlobStore
from flctl.tensors import save_parameters, sha256_file

CLIENTS = ("c1", "c2", "c3")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _round(tmp_path: Path) -> tuple[BlobStore, str, dict[str, Path]]:
    """A blob store holding a base model, and one update file per client (not yet stored)."""
    blobs = BlobStore(tmp_path / "blobs")
    rng = np.random.default_rng(0)
    save_parameters({"w": torch.zeros(3000), "n": torch.tensor(0)}, tmp_path / "base")
    temp, handle = blobs.temp_file()
    handle.close()
    shutil.copy(tmp_path / "base", temp)
    base = blobs.commit_temp(temp, sha256_file(temp))
    files = {}
    for i, client in enumerate(CLIENTS):
        files[client] = tmp_path / f"{client}.part"
        params = {"w": torch.from_numpy(rng.standard_normal(3000).astype(np.float32))}
        save_parameters({**params, "n": torch.tensor(i)}, files[client])
    return blobs, base, files


def _stream(blobs: BlobStore, base: str, selected: tuple[str, ...] = CLIENTS) -> RoundStream:
    return RoundStream(
        1,
        selected,
        blobs.path(base),
        base,
        blobs,
        lambda claims: cap_weights(claims, max_examples=100, max_share=1.0),
    )


def _accept(blobs: BlobStore, part: Path) -> Path:
    """Move a part file into the blob store as the coordinator does (a rename)."""
    temp, handle = blobs.temp_file()
    handle.close()
    temp.unlink()
    os.replace(part, temp)
    return blobs.path(blobs.commit_temp(temp, sha256_file(temp)))


def _whole(blobs: BlobStore, base: str, updates: list[WeightedUpdate], out: Path) -> str:
    FedAvg().aggregate(blobs.path(base), updates, out)
    return sha256_file(out)


def _temp_files(blobs: BlobStore) -> list[Path]:
    return sorted((blobs.root / "tmp").iterdir())


def test_the_streamed_model_is_taken_when_the_round_took_those_files(tmp_path: Path) -> None:
    blobs, base, files = _round(tmp_path)

    async def main() -> None:
        stream = _stream(blobs, base)
        weights = {"c1": 5, "c2": 500, "c3": 7}  # c2's claim is capped to 100
        for client in CLIENTS:
            stream.offer(client, files[client], files[client].stat().st_size, weights[client])
        assert stream.started
        accepted = {c: _accept(blobs, files[c]) for c in CLIENTS}
        # the acceptance offers the same file again (now a blob): nothing changes
        for client in CLIENTS:
            stream.offer(client, accepted[client], accepted[client].stat().st_size, 1)
        updates = [WeightedUpdate(accepted[c], min(weights[c], 100), c) for c in CLIENTS]
        taken = await stream.take(updates)
        assert taken is not None
        temp, digest, non_finite = taken
        assert sha256_file(temp) == digest and non_finite == ""
        assert digest == _whole(blobs, base, updates, tmp_path / "whole")
        temp.unlink()

    asyncio.run(main())
    assert _temp_files(blobs) == []


@pytest.mark.parametrize("change", ["weight", "other_update", "file", "not_begun", "refused"])
def test_the_stream_is_discarded_when_the_round_took_something_else(
    tmp_path: Path, change: str
) -> None:
    blobs, base, files = _round(tmp_path)

    async def main() -> None:
        stream = _stream(blobs, base)
        offered = CLIENTS[:2] if change == "not_begun" else CLIENTS
        for client in offered:
            stream.offer(client, files[client], files[client].stat().st_size, 10)
        assert stream.started is (change != "not_begun")
        if change == "refused":
            stream.refused("c3")
        accepted = {}
        for client in CLIENTS:
            if change == "file" and client == "c3":
                # the accepted c3 is a copy (an upload started over): not the file streamed
                copy = tmp_path / "copy"
                shutil.copy(files[client], copy)
                accepted[client] = _accept(blobs, copy)
            else:
                accepted[client] = _accept(blobs, files[client])
        updates = [WeightedUpdate(accepted[c], 10, c) for c in CLIENTS]
        if change == "weight":
            updates[0] = WeightedUpdate(accepted["c1"], 9, "c1")
        if change == "other_update":
            updates = updates[:2]
        assert await stream.take(updates) is None
        await asyncio.sleep(0.1)  # a cancelled worker stops at its next wait

    asyncio.run(main())
    assert _temp_files(blobs) == []


def test_an_update_offered_again_with_another_file_makes_a_started_stream_stale(
    tmp_path: Path,
) -> None:
    blobs, base, files = _round(tmp_path)

    async def main() -> None:
        stream = _stream(blobs, base, selected=("c1", "c2"))
        stream.offer("c1", files["c1"], files["c1"].stat().st_size, 1)
        # before the stream starts, a new file replaces the old one
        shutil.copy(files["c1"], tmp_path / "again")
        stream.offer("c1", tmp_path / "again", files["c1"].stat().st_size, 1)
        stream.offer("c2", files["c2"], files["c2"].stat().st_size, 1)
        assert stream.started and not stream.stale
        stream.offer("c2", files["c3"], files["c3"].stat().st_size, 1)
        assert stream.stale == "c2's update changed while streaming"
        stream.discard()
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert _temp_files(blobs) == []


def test_a_stream_that_cannot_start_does_not_fail_the_offer(tmp_path: Path) -> None:
    blobs, base, files = _round(tmp_path)

    def refuse(claims: list[int]) -> list[int]:
        raise ValueError("no weights today")

    async def main() -> None:
        stream = RoundStream(1, ("c1",), blobs.path(base), base, blobs, refuse)
        stream.offer("c1", files["c1"], files["c1"].stat().st_size, 1)  # does not raise
        assert "no weights today" in stream.stale and not stream.started
        updates = [WeightedUpdate(_accept(blobs, files["c1"]), 1, "c1")]
        assert await stream.take(updates) is None
        # a client never selected, or a file already gone, is ignored
        stream.offer("c9", files["c2"], 1, 1)
        stream.offer("c1", tmp_path / "gone", 1, 1)

    asyncio.run(main())
    assert _temp_files(blobs) == []


def test_a_stream_does_not_start_without_room_for_the_model_beside_the_uploads(
    tmp_path: Path,
) -> None:
    blobs, base, files = _round(tmp_path)

    async def main() -> None:
        stream = RoundStream(
            1,
            CLIENTS,
            blobs.path(base),
            base,
            blobs,
            lambda claims: claims,
            min_free_bytes=1 << 60,  # more than any disk: server.min_free_mb cannot be kept
        )
        for client in CLIENTS:
            stream.offer(client, files[client], files[client].stat().st_size, 1)
        assert not stream.started and "MiB free" in stream.stale
        updates = [WeightedUpdate(_accept(blobs, files[c]), 1, c) for c in CLIENTS]
        assert await stream.take(updates) is None

    asyncio.run(main())
    assert _temp_files(blobs) == []
