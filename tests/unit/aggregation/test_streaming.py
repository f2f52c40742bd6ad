"""The streaming mean: FedAvg's bits, computed while the update files are still being written."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from flctl.aggregation import (
    ArrivingUpdate,
    FedAvg,
    StreamCancelledError,
    StreamingMean,
    WeightedUpdate,
)
from flctl.aggregation._fedavg import PIECE_ELEMENTS, pieces
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import encode_update, load_parameters, save_parameters, sha256_file

from .conftest import federation

pytestmark = pytest.mark.usefixtures("one_thread")

#: a tensor of 2.5 pieces, so that pieces end inside it and at its end
_BIG = PIECE_ELEMENTS * 5 // 2


def _stacks(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "big": rng.standard_normal((count, _BIG)).astype(np.float32),
        "small": rng.standard_normal((count, 3, 5)).astype(np.float32),
        "empty": np.zeros((count, 0), dtype=np.float32),
    }


def _out(path: Path) -> Path:
    """The output file, made empty: StreamingMean writes an existing file, never makes one."""
    path.touch()
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_parameters(path))


def _arriving(stack: ExitStack, updates: Sequence[WeightedUpdate]) -> list[ArrivingUpdate]:
    out = []
    for update in updates:
        fd = os.open(update.path, os.O_RDONLY)
        stack.callback(os.close, fd)
        out.append(
            ArrivingUpdate(
                update.client_id, update.path, fd, update.path.stat().st_size, update.num_examples
            )
        )
    return out


@contextmanager
def _growing(
    updates: Sequence[WeightedUpdate], folder: Path, *, stop_at: int | None = None
) -> Iterator[list[WeightedUpdate]]:
    """Copies of ``updates`` written a little at a time by a thread, interleaved (uploads).

    With ``stop_at``, each copy stops growing after that many bytes.
    """
    folder.mkdir()
    sources = [u.path.read_bytes() for u in updates]
    copies = [WeightedUpdate(folder / u.path.name, u.num_examples, u.client_id) for u in updates]
    handles = [open(c.path, "wb") for c in copies]  # noqa: SIM115 - closed by the thread

    def write() -> None:
        step = 300_001  # not a multiple of anything: pieces land split across writes
        for start in range(0, max(len(s) for s in sources), step):
            for data, handle in zip(sources, handles, strict=True):
                end = min(start + step, len(data), stop_at if stop_at is not None else len(data))
                if start < end:
                    handle.write(data[start:end])
                    handle.flush()
            time.sleep(0.002)
        for handle in handles:
            handle.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield copies
    finally:
        writer.join()


def _streamed(
    base: Path,
    files: Sequence[WeightedUpdate],
    sizes: Sequence[int],
    out: Path,
    *,
    base_digest: str | None = None,
) -> None:
    with ExitStack() as stack:
        arriving = []
        for update, size in zip(files, sizes, strict=True):
            fd = os.open(update.path, os.O_RDONLY)
            stack.callback(os.close, fd)
            arriving.append(
                ArrivingUpdate(update.client_id, update.path, fd, size, update.num_examples)
            )
        StreamingMean(base, arriving, _out(out), base_digest=base_digest).run()


def test_pieces_cover_a_tensor_in_order() -> None:
    assert list(pieces(0)) == [(0, 0)]
    assert list(pieces(5)) == [(0, 5)]
    got = list(pieces(_BIG))
    assert got[0] == (0, PIECE_ELEMENTS) and got[-1][1] == _BIG
    assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))


@pytest.mark.parametrize("encoding", ["full", "delta"])
def test_whole_files_give_fedavgs_bits(tmp_path: Path, encoding: str) -> None:
    base, updates = federation(tmp_path, _stacks(3), weights=[5, 1, 3], encoding=encoding)
    FedAvg().aggregate(base, updates, tmp_path / "whole")
    with ExitStack() as stack:
        StreamingMean(base, _arriving(stack, updates), _out(tmp_path / "streamed")).run()
    assert sha256_file(tmp_path / "streamed") == sha256_file(tmp_path / "whole")


def test_files_still_arriving_give_fedavgs_bits(tmp_path: Path) -> None:
    """Updates written a piece at a time while the mean runs: the same file as at the end."""
    base, updates = federation(tmp_path, _stacks(3, seed=1), weights=[2, 7, 4])
    # arrival order is not summation order: the last client's file is listed first
    updates = updates[::-1]
    FedAvg().aggregate(base, updates, tmp_path / "whole")
    sizes = [u.path.stat().st_size for u in updates]
    with _growing(updates, tmp_path / "up") as files:
        _streamed(base, files, sizes, tmp_path / "streamed")
    assert sha256_file(tmp_path / "streamed") == sha256_file(tmp_path / "whole")


def test_a_delta_in_half_precision_streams_too(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    base_params = {"w": torch.from_numpy(rng.standard_normal(_BIG).astype(np.float32))}
    save_parameters(base_params, tmp_path / "base")
    updates = []
    for i, dtype in enumerate(["float16", "bfloat16", "float32"]):
        trained = {"w": base_params["w"] + 0.01 * (i + 1)}
        path = tmp_path / f"u{i}"
        encode_update(tmp_path / "base", trained, path, encoding="delta", dtype=dtype)
        updates.append(WeightedUpdate(path, i + 1, f"c{i}"))
    FedAvg().aggregate(tmp_path / "base", updates, tmp_path / "whole")
    sizes = [u.path.stat().st_size for u in updates]
    with _growing(updates, tmp_path / "up") as files:
        _streamed(
            tmp_path / "base",
            files,
            sizes,
            tmp_path / "streamed",
            base_digest=sha256_file(tmp_path / "base"),
        )
    assert sha256_file(tmp_path / "streamed") == sha256_file(tmp_path / "whole")


def test_cancel_stops_a_mean_waiting_for_bytes(tmp_path: Path) -> None:
    base, updates = federation(tmp_path, _stacks(2, seed=3))
    sizes = [u.path.stat().st_size for u in updates]
    with _growing(updates, tmp_path / "up", stop_at=4096) as files, ExitStack() as stack:
        fds = [os.open(f.path, os.O_RDONLY) for f in files]
        for fd in fds:
            stack.callback(os.close, fd)
        mean = StreamingMean(
            base,
            [
                ArrivingUpdate(f.client_id, f.path, fd, size, 1)
                for f, fd, size in zip(files, fds, sizes, strict=True)
            ],
            _out(tmp_path / "streamed"),
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                mean.run()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive(), "the mean finished without the updates' bytes"
        mean.cancel()
        worker.join(timeout=10)
        assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], StreamCancelledError)
    assert mean.cancelled


def test_an_update_of_another_model_is_refused_naming_its_client(tmp_path: Path) -> None:
    base, updates = federation(tmp_path, _stacks(2, seed=4))
    save_parameters({"other": torch.zeros(3)}, tmp_path / "odd")
    updates[1] = WeightedUpdate(tmp_path / "odd", 1, "c1")
    with ExitStack() as stack, pytest.raises(InconsistentUpdatesError, match="'c1'"):
        StreamingMean(base, _arriving(stack, updates), _out(tmp_path / "streamed")).run()
    assert (tmp_path / "streamed").stat().st_size == 0  # nothing written


def test_no_updates_or_a_weight_of_zero_is_refused(tmp_path: Path) -> None:
    base, updates = federation(tmp_path, _stacks(2, seed=5))
    with pytest.raises(NotEnoughUpdatesError):
        StreamingMean(base, [], _out(tmp_path / "streamed")).run()
    with ExitStack() as stack:
        arriving = _arriving(stack, updates)
        bad = [arriving[0], ArrivingUpdate("c1", arriving[1].path, arriving[1].fd, 1, 0)]
        with pytest.raises(InconsistentUpdatesError, match="num_examples=0"):
            StreamingMean(base, bad, _out(tmp_path / "streamed")).run()


def test_the_gates_first_check_is_made_as_the_model_is_written(tmp_path: Path) -> None:
    """A model holding Inf is named as the gate names it, reading the file: the same verdict."""
    from flctl.coordinator._gate import non_finite_tensors

    base, updates = federation(tmp_path, _stacks(2, seed=6))
    # the stream does not judge updates (the upload did): one holding Inf is written as is
    held = {n: torch.zeros(3, 5) if n == "small" else t for n, t in _load(updates[1].path).items()}
    held["small"][2, 3] = float("inf")
    save_parameters(held, updates[1].path)
    with ExitStack() as stack:
        mean = StreamingMean(base, _arriving(stack, updates), _out(tmp_path / "streamed"))
        mean.run()
    assert mean.non_finite == "tensor 'small' holds NaN or Inf values"
    assert non_finite_tensors(tmp_path / "streamed") == mean.non_finite
    finite = StreamingMean(base, [], tmp_path / "unused")
    assert finite.non_finite == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finite_check_by_sum_is_exact(dtype: torch.dtype) -> None:
    from flctl.aggregation._fedavg import _finite

    big = torch.finfo(dtype).max
    assert _finite(torch.full((1000,), big, dtype=dtype))  # the sum overflows, no value does
    assert _finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        piece = torch.ones(1000, dtype=dtype)
        piece[517] = bad
        assert not _finite(piece)
    mixed = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # a NaN sum
    assert not _finite(mixed)


def test_an_output_deleted_before_the_mean_writes_is_not_made_again(tmp_path: Path) -> None:
    base, updates = federation(tmp_path, _stacks(2, seed=7))
    with ExitStack() as stack, pytest.raises(FileNotFoundError):
        StreamingMean(base, _arriving(stack, updates), tmp_path / "gone").run()
    assert not (tmp_path / "gone").exists()
