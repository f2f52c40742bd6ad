"""Uploads in progress, persisted so that a cut-off upload carries on instead of starting over.

Each upload has an id (from ``BeginUpload``) bound to the identity that began it, a
``<id>.json`` record (round, task, digest, size, encoding and the rest of the header) and a
``<id>.part`` file holding the bytes received so far, under ``<state>/uploads/``. The record is
written temp -> fsync -> rename, so it is either whole or absent; the part file's length is the
offset the coordinator confirms. Nothing in a part file is trusted: when the upload completes,
the whole file is hashed and checked against the header again (the bytes from earlier streams
are re-read, not remembered), and a mismatch discards it.

Part files live until their upload completes or is refused, their round ends (the round
engine discards a round's uploads when it leaves training), or the coordinator starts and finds
their round no longer open.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flctl.core.errors import InvalidInputError, NotFoundError, PermissionDeniedError

__all__ = ["PartialUpload", "PartialUploads"]

_ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class PartialUpload:
    """An upload begun and not finished: what its header said, and who began it."""

    upload_id: str
    client_id: str
    server_round: int
    task_id: str
    digest: str
    size: int
    num_examples: int
    codec: str
    encoding: str
    dtype: str
    base_digest: str
    created: float

    def matches(self, other: PartialUpload) -> bool:
        """The same update: identity, round, task and bytes (digest and size)."""
        return (
            self.client_id,
            self.server_round,
            self.task_id,
            self.digest,
            self.size,
            self.encoding,
            self.dtype,
            self.base_digest,
        ) == (
            other.client_id,
            other.server_round,
            other.task_id,
            other.digest,
            other.size,
            other.encoding,
            other.dtype,
            other.base_digest,
        )


class PartialUploads:
    """The ``uploads/`` folder of a state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._active: set[str] = set()
        # the records, read once: every BeginUpload looks them up, and re-reading the folder
        # each time would cost a file per upload in progress
        self._index: dict[str, PartialUpload] = {}
        for path in sorted(self.root.glob("*.json")):
            record = self._read(path.stem)
            if record is None:
                self.discard(path.stem)
            else:
                self._index[record.upload_id] = record

    # ------------------------------------------------------------------ paths

    def part_path(self, upload_id: str) -> Path:
        """The file that holds the bytes received so far."""
        return self.root / f"{upload_id}.part"

    def _record_path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.json"

    # ------------------------------------------------------------------ records

    def all(self) -> list[PartialUpload]:
        """Every upload begun and not finished (unreadable records were removed at start)."""
        return sorted(self._index.values(), key=lambda r: r.upload_id)

    def _read(self, upload_id: str) -> PartialUpload | None:
        try:
            raw = json.loads(self._record_path(upload_id).read_text(encoding="utf-8"))
            record = PartialUpload(**raw)
        except (OSError, ValueError, TypeError):
            return None
        return record if record.upload_id == upload_id else None

    def get(self, upload_id: str, client_id: str) -> PartialUpload:
        """The upload ``upload_id``, which must have been begun by ``client_id``.

        Raises:
            InvalidInputError: Not an upload id.
            NotFoundError: No such upload (finished, refused, or its round ended).
            PermissionDeniedError: Another identity began it.
        """
        if _ID_RE.fullmatch(upload_id) is None:
            raise InvalidInputError(f"upload id {upload_id[:40]!r} is malformed")
        record = self._index.get(upload_id)
        if record is None:
            raise NotFoundError(
                f"no upload {upload_id}: it finished, was refused, or its round ended",
                hint="begin the upload again",
            )
        if record.client_id != client_id:
            raise PermissionDeniedError(f"upload {upload_id} belongs to another identity")
        return record

    def holds(self, upload_id: str) -> bool:
        """Whether the upload is still begun (not finished, refused or dropped)."""
        return upload_id in self._index

    def trim(self, client_id: str, keep: int, *, spare: str = "") -> int:
        """Drop ``client_id``'s oldest idle uploads down to ``keep``; return how many."""
        idle = sorted(
            (
                r
                for r in self._index.values()
                if r.client_id == client_id
                and r.upload_id not in self._active
                and r.upload_id != spare
            ),
            key=lambda r: r.created,
        )
        mine = sum(1 for r in self._index.values() if r.client_id == client_id)
        dropped = 0
        for record in idle:
            if mine - dropped <= keep:
                break
            self.discard(record.upload_id)
            dropped += 1
        return dropped

    def find(self, wanted: PartialUpload) -> PartialUpload | None:
        """An earlier upload of the same update by the same identity."""
        for record in self.all():
            if record.matches(wanted):
                return record
        return None

    def begin(self, **fields: Any) -> PartialUpload:
        """Record a new upload (an empty part file and its record, durably)."""
        record = PartialUpload(upload_id=uuid.uuid4().hex, created=time.time(), **fields)
        part = self.part_path(record.upload_id)
        target = self._record_path(record.upload_id)
        temp = target.with_suffix(".json.tmp")
        try:
            part.touch()
            with open(temp, "w", encoding="utf-8") as handle:
                json.dump(asdict(record), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except OSError:
            # a full disk (or any write failure) leaves nothing behind: we made these files
            for made in (part, temp, target):
                made.unlink(missing_ok=True)
            raise
        self._index[record.upload_id] = record
        return record

    def held(self, upload_id: str) -> int:
        """Bytes on disk for the upload: the offset its next stream must start at."""
        try:
            return self.part_path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    # ------------------------------------------------------------------ streams

    def acquire(self, upload_id: str) -> bool:
        """Mark the upload as being received; False when another stream has it."""
        if upload_id in self._active:
            return False
        self._active.add(upload_id)
        return True

    def release(self, upload_id: str) -> None:
        """The stream that held the upload ended."""
        self._active.discard(upload_id)

    # ------------------------------------------------------------------ cleaning

    def discard(self, upload_id: str) -> None:
        """Remove an upload's record and bytes."""
        self._index.pop(upload_id, None)
        self._record_path(upload_id).unlink(missing_ok=True)
        self.part_path(upload_id).unlink(missing_ok=True)

    def forget(self, upload_id: str) -> None:
        """Remove the record of an upload whose part file was moved into the blob store."""
        self._index.pop(upload_id, None)
        self._record_path(upload_id).unlink(missing_ok=True)

    def discard_round(self, server_round: int) -> int:
        """Remove the uploads of a round that ended; return how many."""
        return self.discard_where(lambda r: r.server_round == server_round)

    def discard_except(self, open_round: int | None) -> int:
        """Remove every upload not for ``open_round`` (at start), and stray files."""
        count = self.discard_where(lambda r: r.server_round != open_round)
        known = {p.stem for p in self.root.glob("*.json")}
        for path in self.root.iterdir():
            stem = path.name.split(".", 1)[0]
            if stem not in known or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        return count

    def discard_where(self, predicate: Any) -> int:
        """Remove the uploads whose record satisfies ``predicate`` and no stream holds."""
        count = 0
        for record in self.all():
            if predicate(record) and record.upload_id not in self._active:
                self.discard(record.upload_id)
                count += 1
        return count
