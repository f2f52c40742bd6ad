"""Small file helpers of the certificate folder: bounded reads, atomic writes with a mode."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from flctl.core.errors import CertificateError

__all__ = [
    "CERT_MODE",
    "DIR_MODE",
    "KEY_MODE",
    "MAX_PEM_BYTES",
    "fsync_dir",
    "read_pem",
    "write_atomic",
]

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
# A PEM certificate or key is a few KiB; anything far larger is the wrong file.
MAX_PEM_BYTES = 1 << 20


def read_pem(path: Path, hint: str) -> bytes:
    """Read a PEM file of at most MAX_PEM_BYTES, or raise :class:`CertificateError`."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise CertificateError(f"{path} not found", hint=hint) from None
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from exc
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{path} is larger than {MAX_PEM_BYTES} bytes; not a PEM file")
    return data


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, mode)
        try:
            if mode != KEY_MODE:
                # A restrictive umask would hide a certificate that others must read; a key
                # keeps the mode it was created with (umask can only narrow it).
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CertificateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable (best effort)."""
    # Not every platform can open a folder, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
