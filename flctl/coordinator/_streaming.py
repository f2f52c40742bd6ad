"""A round's FedAvg computed while its updates upload, used only if it is the round's model.

When every client selected for a round has begun its upload (or had its update accepted),
:class:`RoundStream` starts a :class:`~flctl.aggregation.StreamingMean` over their files in a
worker thread, with the weights the round would give them: the model is summed, written and
hashed as the bytes land, so when the round's wait ends little is left to do
(docs/strategies.md, "Aggregating while the updates upload").

It is a guess about the round, checked before it is used (:meth:`RoundStream.take`): the
round's final updates must be exactly those streamed (the same clients, the same weights),
and each accepted update's blob must be the very file the stream read (the same inode: the
coordinator verified those bytes against their digest before accepting them, and bytes once
written are never rewritten). Anything else (a client left, an upload started over, an
update refused or moved into an existing blob, an outlier dropped) discards the stream and
the round aggregates whole, as without it; the result is the same bits either way, since both
run :func:`~flctl.aggregation._fedavg.write_weighted_mean` in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flctl.aggregation import ArrivingUpdate, StreamingMean, WeightedUpdate
from flctl.store import BlobStore
from flctl.tensors import FollowingHasher, sha256_file

__all__ = ["MAX_STREAMED_UPDATES", "RoundStream"]

log = logging.getLogger("flctl.coordinator")

#: Rounds of more selected clients aggregate whole: a streamed update holds two file
#: descriptors while the round trains, and the uploads of a round that large queue for the
#: coordinator's upload slots anyway, so most of its updates are whole before the last begins.
MAX_STREAMED_UPDATES = 256

MiB = 1 << 20


@dataclass(frozen=True)
class _Input:
    """A file the stream may read: an upload's part file or an accepted update's blob."""

    path: Path
    fd: int
    size: int
    num_examples: int
    #: (device, inode): the file, whatever it is named later
    file: tuple[int, int]


class RoundStream:
    """One round's streaming aggregate (see the module).

    Args:
        server_round: The round.
        selected: The clients the round waits for: the stream starts once each has an input.
        base: The round's base model; ``base_digest`` its digest.
        blobs: The blob store (the output is one of its temp files).
        weigh: The weights of claimed example counts, as the round would cap them.
        min_free_bytes: The room the disk must keep (``server.min_free_mb``): a stream starts
            only if the model fits beside the bytes the uploads still bring, and that much.
    """

    def __init__(
        self,
        server_round: int,
        selected: Sequence[str],
        base: Path,
        base_digest: str,
        blobs: BlobStore,
        weigh: Callable[[list[int]], list[int]],
        *,
        min_free_bytes: int = 0,
    ) -> None:
        self.server_round = server_round
        self._selected = frozenset(selected)
        self._base = base
        self._base_digest = base_digest
        self._blobs = blobs
        self._weigh = weigh
        self._min_free_bytes = min_free_bytes
        self._inputs: dict[str, _Input] = {}
        #: client -> the weight the stream gave it
        self._weights: dict[str, int] = {}
        self._mean: StreamingMean | None = None
        self._task: asyncio.Future[tuple[str, str]] | None = None
        self._temp: Path | None = None
        #: why the stream cannot be the round's model ("": it may be)
        self.stale = ""

    @property
    def started(self) -> bool:
        """Whether the streaming mean runs (or ran)."""
        return self._task is not None

    def offer(self, client_id: str, path: Path, size: int, num_examples: int) -> None:
        """``client_id``'s update is at ``path``: an upload begun, or an update accepted.

        The same file offered again (a resumed upload, its acceptance) changes nothing; another
        file for a client already streamed makes the stream stale. Never raises: the upload or
        acceptance that offers the file must not fail for the stream's sake (a stream that
        cannot go on is discarded, and the round aggregates whole).
        """
        if client_id not in self._selected or self.stale:
            return
        try:
            self._offer(client_id, path, size, num_examples)
        except Exception as exc:
            log.warning(
                "round %d: not aggregating while the updates upload: %s",
                self.server_round,
                exc,
                extra={"round": self.server_round},
            )
            self._discard(f"{type(exc).__name__}: {exc}")

    def _offer(self, client_id: str, path: Path, size: int, num_examples: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # gone already: the round aggregates whole if this was its update
        stat = os.fstat(fd)
        new = _Input(path, fd, size, num_examples, (stat.st_dev, stat.st_ino))
        old = self._inputs.get(client_id)
        if old is not None and old.file == new.file and old.size == size:
            os.close(fd)
            return
        if self.started:
            os.close(fd)
            self._discard(f"{client_id}'s update changed while streaming")
            return
        if old is not None:
            os.close(old.fd)
        self._inputs[client_id] = new
        if set(self._inputs) == self._selected:
            self._start()

    def refused(self, client_id: str) -> None:
        """``client_id``'s update was refused for good: a stream over it is discarded now."""
        if client_id in self._inputs:
            self._discard(f"{client_id}'s update was refused")

    def _start(self) -> None:
        # the uploads come first: the stream's model (the base's size) must fit beside what
        # they still bring, or it would take the room a client's upload needs
        still = sum(max(0, i.size - os.fstat(i.fd).st_size) for i in self._inputs.values())
        need = self._base.stat().st_size + still + self._min_free_bytes
        free = shutil.disk_usage(self._blobs.tmp_dir).free
        if free < need:
            why = f"{free / MiB:.0f} MiB free, the uploads and the model need {need / MiB:.0f} MiB"
            log.info(
                "round %d: not aggregating while the updates upload: %s",
                self.server_round,
                why,
                extra={"round": self.server_round},
            )
            self._discard(why)
            return
        clients = sorted(self._inputs)
        weights = self._weigh([self._inputs[c].num_examples for c in clients])
        self._weights = dict(zip(clients, weights, strict=True))
        temp, handle = self._blobs.temp_file()
        handle.close()
        self._temp = temp
        self._mean = StreamingMean(
            self._base,
            [
                ArrivingUpdate(c, self._inputs[c].path, self._inputs[c].fd, self._inputs[c].size, w)
                for c, w in self._weights.items()
            ],
            temp,
            base_digest=self._base_digest,
        )
        self._task = asyncio.ensure_future(asyncio.to_thread(self._run, self._mean, temp))
        log.info(
            "round %d: aggregating while %d updates upload",
            self.server_round,
            len(clients),
            extra={"round": self.server_round},
        )

    @staticmethod
    def _run(mean: StreamingMean, temp: Path) -> tuple[str, str]:
        with FollowingHasher(temp) as hasher:
            mean.run()
        return hasher.digest() or sha256_file(temp), mean.non_finite

    def _mismatch(self, updates: Sequence[WeightedUpdate]) -> str:
        """Why ``updates`` are not what was streamed ("": they are)."""
        if self.stale:
            return self.stale
        if not self.started:
            return "not every selected client began its upload"
        if sorted(u.client_id for u in updates) != sorted(self._weights):
            return "the round took other updates than those streamed"
        for update in updates:
            if self._weights[update.client_id] != update.num_examples:
                return f"{update.client_id}'s weight changed"
            try:
                stat = os.stat(update.path)
            except OSError:
                return f"{update.client_id}'s update is missing"
            if (stat.st_dev, stat.st_ino) != self._inputs[update.client_id].file:
                return f"{update.client_id}'s accepted update is not the file streamed"
        return ""

    async def take(self, updates: Sequence[WeightedUpdate]) -> tuple[Path, str, str] | None:
        """The streamed model, if it is ``updates``' FedAvg.

        Returns its temp file, its digest, and why it holds a NaN or an Inf ("" when every
        value is finite: the validation gate's first check, made as it was written). The
        caller commits the temp file (or deletes it). None: the stream is discarded, and the
        round aggregates whole.
        """
        why = self._mismatch(updates)
        if not why:
            assert self._task is not None
            try:
                digest, non_finite = await asyncio.shield(self._task)
            except Exception as exc:  # the whole-round pass reports a bad update, naming it
                why = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
            else:
                temp, self._temp = self._temp, None
                self._discard("taken")
                assert temp is not None
                return temp, digest, non_finite
        log.info(
            "round %d: aggregating whole: %s",
            self.server_round,
            why,
            extra={"round": self.server_round},
        )
        self._discard(why)
        return None

    def discard(self) -> None:
        """Stop streaming (the round ended): its files are closed, its output deleted."""
        self._discard("the round ended")

    def _discard(self, why: str) -> None:
        self.stale = self.stale or why
        if self._mean is not None:
            self._mean.cancel()
        # the output goes now, even while the worker stops: it writes through its own
        # descriptors, and never makes the file again (TensorWriter create=False)
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None
        if self._task is not None and not self._task.done():
            self._task.add_done_callback(lambda _: self._release())
        else:
            self._release()

    def _release(self) -> None:
        """Close the inputs (the worker is done with them) and delete an output not taken."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.exception()  # retrieved: a discarded stream's error is not news
        for entry in self._inputs.values():
            with contextlib.suppress(OSError):
                os.close(entry.fd)
        self._inputs.clear()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None
