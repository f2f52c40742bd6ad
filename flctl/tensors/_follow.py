"""Hashing a file while another thread writes it, front to back."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["FollowingHasher"]


class FollowingHasher:
    """SHA-256 of a file that a writer is filling front to back, taken as the bytes land.

    A thread reads what the writer has written so far (a read never goes past the file's
    current end, and the kernel moves the end only once the bytes before it are in place) and
    hashes it, while the writer computes the rest: the hash costs no pass of its own once the
    writer is done. For a writer that only appends, such as
    :class:`~flctl.tensors.TensorWriter`; a writer that seeks back and rewrites would make the
    digest wrong, so only such writers may be followed.

    Use it as a context manager around the writing, then :meth:`digest`:

        with FollowingHasher(path) as hasher:
            write_the_file(path)
        digest = hasher.digest() or sha256_file(path)

    Args:
        path: An existing (usually empty) file the writer opens for writing.
        chunk: Bytes read at a time.
        poll_s: How long the thread waits before looking again when it caught up.
    """

    def __init__(self, path: Path, *, chunk: int = 1 << 20, poll_s: float = 0.002) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._inode = os.fstat(self._fd).st_ino
        self._chunk = chunk
        self._poll_s = poll_s
        self._hash = hashlib.sha256()
        self._offset = 0
        self._done = threading.Event()
        self._error: OSError | None = None
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._follow, name="flctl-hash", daemon=True)
        self._thread.start()

    def __enter__(self) -> FollowingHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if exc[0] is None:
            self._digest = self._check()
        os.close(self._fd)

    @property
    def hashed(self) -> int:
        """How many bytes of the file were hashed so far."""
        return self._offset

    def digest(self) -> str | None:
        """The file's SHA-256 once written; None when it cannot be trusted: hash it again.

        None when the path was replaced by another file (the writer renamed one into place),
        the file is not as long as what was hashed, or a read failed.
        """
        return self._digest

    def _stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _check(self) -> str | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        if self._error is not None or stat.st_ino != self._inode or stat.st_size != self._offset:
            return None
        return self._hash.hexdigest()

    def _follow(self) -> None:
        try:
            while True:
                finished = self._done.is_set()  # read before the last look: nothing is missed
                data = os.pread(self._fd, self._chunk, self._offset)
                if data:
                    self._hash.update(data)
                    self._offset += len(data)
                    continue
                if finished:
                    return
                self._done.wait(self._poll_s)
        except OSError as exc:
            self._error = exc
