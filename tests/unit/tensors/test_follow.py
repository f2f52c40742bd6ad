"""FollowingHasher: a file's SHA-256 taken while a writer fills it, front to back."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from flctl.tensors import FollowingHasher, TensorWriter, sha256_file


def _write_slowly(path: Path, pieces: list[bytes], pause_s: float) -> None:
    with path.open("wb") as handle:
        for piece in pieces:
            handle.write(piece)
            handle.flush()
            time.sleep(pause_s)


def test_the_digest_of_a_file_written_while_followed_is_the_files(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.touch()
    pieces = [os.urandom(n) for n in (1, 4096, 100_000, 3, 1 << 20, 7)]
    with FollowingHasher(path, chunk=65536) as hasher:
        writer = threading.Thread(target=_write_slowly, args=(path, pieces, 0.003))
        writer.start()
        writer.join()
    assert hasher.digest() == hashlib.sha256(b"".join(pieces)).hexdigest() == sha256_file(path)


def test_a_tensor_writer_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.touch()
    tensors = {f"t{i}": torch.randn(64, 33) for i in range(5)}
    shapes = dict.fromkeys(tensors, ("F32", (64, 33)))
    with FollowingHasher(path, chunk=4096) as hasher, TensorWriter(path, shapes) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert hasher.digest() == sha256_file(path)


def test_a_file_renamed_into_place_or_cut_short_is_not_vouched_for(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.touch()
    with FollowingHasher(path) as hasher:
        other = tmp_path / "other"
        other.write_bytes(b"written elsewhere")
        os.replace(other, path)  # another file now has the name
    assert hasher.digest() is None
    path.write_bytes(b"")
    with FollowingHasher(path) as hasher:
        path.write_bytes(b"abcdef")
        deadline = time.monotonic() + 10
        while hasher.hashed < 6 and time.monotonic() < deadline:  # all six bytes hashed
            time.sleep(0.005)
        assert hasher.hashed == 6
        with path.open("r+b") as handle:
            handle.truncate(3)
    assert hasher.digest() is None


def test_nothing_is_vouched_for_when_the_writing_failed(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.touch()
    with pytest.raises(RuntimeError), FollowingHasher(path) as hasher:
        path.write_bytes(b"half")
        raise RuntimeError("the strategy failed")
    assert hasher.digest() is None
