"""WriteBehind: a file written through it holds exactly what was written; with ``drop`` its
written-back stretches leave the page cache (checked with mincore where the system has it)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from flctl.store import WriteBehind

MiB = 1 << 20


def _write(path: Path, pieces: list[bytes], *, drop: bool, every: int = MiB) -> None:
    with open(path, "ab") as handle:
        writeback = WriteBehind(handle, every, drop=drop)
        for piece in pieces:
            handle.write(memoryview(piece))
            writeback.wrote(len(piece))
        handle.flush()
        os.fsync(handle.fileno())


def _resident_fraction(path: Path, length: int) -> float | None:
    """Share of the first ``length`` bytes of ``path`` in the page cache (None: unknown).

    The file is mapped (which reads nothing) and ``mincore`` says which pages are cached.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(address, length, vec) != 0:
            return None
        return sum(v & 1 for v in vec) / pages
    finally:
        libc.munmap(address, length)


@pytest.mark.parametrize("drop", [False, True])
def test_the_file_holds_what_was_written(tmp_path: Path, drop: bool) -> None:
    pieces = [os.urandom(300_000 + i) for i in range(20)]  # ~6 MiB in odd sizes
    path = tmp_path / "part"
    _write(path, pieces, drop=drop)
    assert path.read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("drop", [False, True])
def test_resuming_appends_after_the_bytes_held(tmp_path: Path, drop: bool) -> None:
    path = tmp_path / "part"
    first = [os.urandom(MiB) for _ in range(3)]
    rest = [os.urandom(MiB // 2) for _ in range(7)]
    _write(path, first, drop=drop)
    _write(path, rest, drop=drop)  # a second stream continues the part file
    assert path.read_bytes() == b"".join(first + rest)


def test_drop_lets_written_back_stretches_leave_the_page_cache(tmp_path: Path) -> None:
    pieces = [os.urandom(MiB) for _ in range(16)]
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    _write(kept, pieces, drop=False)
    _write(dropped, pieces, drop=True)
    # the first half of each file: long written back when the last stretch was written
    half = 8 * MiB
    control = _resident_fraction(kept, half)
    if control is None or control < 0.9:
        pytest.skip("this system does not report or keep written pages in the page cache")
    measured = _resident_fraction(dropped, half)
    assert measured is not None
    assert measured < 0.2, f"{measured:.0%} of the dropped stretches are still cached"
    assert dropped.read_bytes() == kept.read_bytes() == b"".join(pieces)
