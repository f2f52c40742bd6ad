"""BlobStore against a real folder: atomic writes, digest validation, reads and verification."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InvalidInputError, NotFoundError
from flctl.store import BlobStore, sha256_file


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_put_has_size_and_layout(blobs: BlobStore) -> None:
    data = b"hello world"
    digest = blobs.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert blobs.has(digest)
    assert blobs.size(digest) == len(data)
    assert blobs.path(digest) == blobs.root / "sha256" / digest[:2] / digest[2:]
    assert blobs.path(digest).read_bytes() == data
    assert list(blobs.digests()) == [digest]
    assert list((blobs.root / "tmp").iterdir()) == []


def test_put_is_idempotent(blobs: BlobStore) -> None:
    first = blobs.put_bytes(b"x" * 100)
    mtime = blobs.path(first).stat().st_mtime_ns
    assert blobs.put_bytes(b"x" * 100) == first
    assert blobs.path(first).stat().st_mtime_ns == mtime
    assert list(blobs.digests()) == [first]


def test_absent_blob(blobs: BlobStore) -> None:
    digest = "0" * 64
    assert not blobs.has(digest)
    for call in (
        lambda: blobs.size(digest),
        lambda: blobs.read_range(digest, 0, 1),
        lambda: blobs.iter_chunks(digest),
        lambda: blobs.verify(digest),
    ):
        with pytest.raises(NotFoundError, match="not found"):
            call()


def test_read_range_and_iter_chunks(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 40
    digest = blobs.put_bytes(data)
    assert blobs.read_range(digest, 0, 10) == data[:10]
    assert blobs.read_range(digest, 1000, 500) == data[1000:1500]
    assert blobs.read_range(digest, len(data) - 3, 100) == data[-3:]
    assert blobs.read_range(digest, len(data), 5) == b""
    with pytest.raises(InvalidInputError):
        blobs.read_range(digest, len(data) + 1, 5)
    with pytest.raises(InvalidInputError):
        blobs.read_range(digest, -1, 5)

    chunks = list(blobs.iter_chunks(digest, chunk_size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, 2048]
    assert b"".join(chunks) == data
    assert b"".join(blobs.iter_chunks(digest, offset=5000, chunk_size=999)) == data[5000:]
    assert list(blobs.iter_chunks(digest, offset=len(data))) == []
    with pytest.raises(InvalidInputError):
        blobs.iter_chunks(digest, chunk_size=0)
    with pytest.raises(InvalidInputError):
        blobs.iter_chunks(digest, offset=len(data) + 1)


def test_empty_blob(blobs: BlobStore) -> None:
    digest = blobs.put_bytes(b"")
    assert blobs.size(digest) == 0
    assert list(blobs.iter_chunks(digest)) == []
    assert blobs.verify(digest)


BAD_DIGESTS = [
    "../x",
    "../" + "a" * 61,
    "/etc/passwd",
    "/" + "a" * 63,
    "A" * 64,
    "a" * 63 + "A",
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "a" * 63 + "\n",
    "ab/" + "c" * 61,
    "",
]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_check_digest_refuses_without_touching_disk(blobs: BlobStore, bad: str) -> None:
    before = _files(blobs.root.parent)
    with pytest.raises(InvalidInputError, match="invalid digest"):
        BlobStore.check_digest(bad)
    for call in (
        lambda: blobs.path(bad),
        lambda: blobs.has(bad),
        lambda: blobs.size(bad),
        lambda: blobs.read_range(bad, 0, 1),
        lambda: blobs.iter_chunks(bad),
        lambda: blobs.verify(bad),
    ):
        with pytest.raises(InvalidInputError, match="invalid digest"):
            call()
    temp, f = blobs.temp_file()
    with f:
        f.write(b"data")
    with pytest.raises(InvalidInputError, match="invalid digest"):
        blobs.commit_temp(temp, bad)
    assert temp.exists()  # refused before anything moved
    temp.unlink()
    assert _files(blobs.root.parent) == before


def test_check_digest_refuses_non_str() -> None:
    with pytest.raises(InvalidInputError):
        BlobStore.check_digest(b"a" * 64)  # type: ignore[arg-type]


def test_check_digest_accepts_lowercase_hex() -> None:
    good = hashlib.sha256(b"x").hexdigest()
    assert BlobStore.check_digest(good) == good


def test_commit_temp_moves_atomically(blobs: BlobStore) -> None:
    data = os.urandom(3 * 1024 + 7)
    temp, f = blobs.temp_file()
    assert temp.parent == blobs.root / "tmp"
    hasher = hashlib.sha256()
    with f:
        for i in range(0, len(data), 1000):
            piece = data[i : i + 1000]
            hasher.update(piece)
            f.write(piece)
    digest = hasher.hexdigest()
    assert not blobs.has(digest)
    assert blobs.commit_temp(temp, digest) == digest
    assert not temp.exists()
    assert blobs.has(digest) and blobs.verify(digest)
    assert blobs.path(digest).read_bytes() == data

    # Committing the same content again discards the temp file and keeps the blob.
    temp2, f2 = blobs.temp_file()
    with f2:
        f2.write(data)
    inode = blobs.path(digest).stat().st_ino
    assert blobs.commit_temp(temp2, digest) == digest
    assert not temp2.exists()
    assert blobs.path(digest).stat().st_ino == inode
    assert list((blobs.root / "tmp").iterdir()) == []


def test_commit_temp_refuses_foreign_or_missing_files(blobs: BlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(InvalidInputError):
        blobs.commit_temp(outside, digest)
    assert outside.exists() and not blobs.has(digest)
    with pytest.raises(NotFoundError):
        blobs.commit_temp(blobs.root / "tmp" / "gone.tmp", digest)


def test_corrupted_blob_fails_verify(blobs: BlobStore) -> None:
    data = os.urandom(2 * (1 << 20) + 11)  # spans several 1 MiB pieces
    digest = blobs.put_bytes(data)
    assert blobs.verify(digest)
    path = blobs.path(digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert not blobs.verify(digest)


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_digests_skips_junk(blobs: BlobStore) -> None:
    a = blobs.put_bytes(b"a")
    b = blobs.put_bytes(b"b")
    (blobs.root / "sha256" / "zz").mkdir()
    (blobs.root / "sha256" / "zz" / "junk").write_bytes(b"")
    (blobs.root / "sha256" / "README").write_bytes(b"")
    assert list(blobs.digests()) == sorted([a, b])


def test_clean_temp(blobs: BlobStore) -> None:
    old, f_old = blobs.temp_file()
    f_old.close()
    new, f_new = blobs.temp_file()
    f_new.close()
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert blobs.clean_temp(older_than_s=600) == 1
    assert not old.exists() and new.exists()
    assert blobs.clean_temp() == 1
    assert list((blobs.root / "tmp").iterdir()) == []


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=20_000),
    chunk_size=st.integers(min_value=1, max_value=5_000),
    offset_frac=st.floats(min_value=0, max_value=1),
)
def test_put_iter_round_trip(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk_size: int, offset_frac: float
) -> None:
    blobs = BlobStore(tmp_path_factory.getbasetemp() / "hypothesis-blobs")
    digest = blobs.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert blobs.size(digest) == len(data)
    chunks = list(blobs.iter_chunks(digest, chunk_size=chunk_size))
    assert b"".join(chunks) == data
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert all(0 < len(c) <= chunk_size for c in chunks)
    offset = int(len(data) * offset_frac)
    assert b"".join(blobs.iter_chunks(digest, offset, chunk_size)) == data[offset:]
    assert blobs.read_range(digest, offset, chunk_size) == data[offset : offset + chunk_size]
    assert blobs.verify(digest)
