"""FedAvg over updates that are still arriving: the model is written as the last bytes land.

The whole-round pass (:meth:`FedAvg.aggregate`) starts once the round's wait ends and reads
every update again. :class:`StreamingMean` runs the same computation
(:func:`~flctl.aggregation._fedavg.write_weighted_mean`, in the same summation order) while the
updates' files are still being written by their uploads: each piece of each tensor is summed
as soon as every update holds it, and written out (the caller hashes the output as it grows,
:class:`~flctl.tensors.FollowingHasher`). When the last byte of the last upload lands, only its
last piece is left to sum, and the new model is written and mostly on disk already.

It computes, it does not decide: the caller (the round engine) knows which updates the round
will take, with which weights, and that each file it handed over is the one the coordinator
verified; it uses the output only when all that still holds at the end of the round, and
discards it otherwise (:meth:`StreamingMean.cancel`). Nothing read here is trusted more than
the whole-round pass trusts it: the header of each file is checked against the model in its
encoding before any tensor is read, exactly as :class:`~flctl.tensors.UpdateReader` checks a
whole file.

Memory: the accumulator and one piece of each update (4 MiB each, whatever K and the model's
size). The output's pages are handed to the disk as they are written
(:class:`~flctl.store.WriteBehind`), so the commit's fsync has little left to do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from flctl.aggregation._fedavg import write_weighted_mean
from flctl.aggregation._strategy import WeightedUpdate
from flctl.aggregation._updates import summation_order
from flctl.core.errors import InconsistentUpdatesError, InvalidInputError, NotEnoughUpdatesError
from flctl.store import WriteBehind
from flctl.tensors import TensorReader, TensorWriter, UpdateReader

__all__ = ["ArrivingUpdate", "StreamCancelledError", "StreamingMean"]


class StreamCancelledError(Exception):
    """The streaming mean was cancelled (:meth:`StreamingMean.cancel`) before it finished."""


@dataclass(frozen=True)
class ArrivingUpdate:
    """An update whose file may still be arriving (an upload in progress), and its weight.

    ``fd`` is open on the file (the caller keeps it; it is duplicated, so the file may be
    renamed, such as into the blob store, meanwhile). ``size`` is the size the file will have
    when whole; it only ever grows, and the bytes it holds never change.
    """

    client_id: str
    path: Path
    fd: int
    size: int
    num_examples: int


class StreamingMean:
    """FedAvg's model of ``updates`` written to ``out`` while their files arrive.

    Args:
        base: The round's base model (whole).
        updates: The updates, with their weights (examples as counted: capped).
        out: The output file, which must exist (it is truncated, then written front to back,
            never rewritten): its owner may delete it at any time, and the mean then fails
            instead of making it again.
        base_digest: The base's SHA-256, which a delta update must name (hashed when needed
            and not given).
        poll_s: How long to wait before looking again at a file that does not hold the next
            piece yet.

    :meth:`run` blocks (run it in a worker thread) until the model is written, or
    :meth:`cancel` is called from another thread.
    """

    def __init__(
        self,
        base: Path,
        updates: Sequence[ArrivingUpdate],
        out: Path,
        *,
        base_digest: str | None = None,
        poll_s: float = 0.005,
    ) -> None:
        self.base = base
        self.updates = list(updates)
        self.out = out
        self._base_digest = base_digest
        self._poll_s = poll_s
        self._cancelled = threading.Event()
        #: after :meth:`run`: why the model holds a NaN or an Inf, as the validation gate
        #: says it ("tensor 'w' holds NaN or Inf values"), or "" when every value is finite
        self.non_finite = ""

    def cancel(self) -> None:
        """Stop :meth:`run` at its next wait (it raises :class:`StreamCancelledError`)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def run(self) -> None:
        """Write the model; see the class.

        Raises:
            StreamCancelledError: :meth:`cancel` was called.
            NotEnoughUpdatesError: No updates.
            InconsistentUpdatesError: Naming the client whose update does not match the model
                (its header), or whose weight is not positive.
        """
        if not self.updates:
            raise NotEnoughUpdatesError("no updates to aggregate")
        for update in self.updates:
            if update.num_examples <= 0:
                raise InconsistentUpdatesError(
                    f"update from {update.client_id!r} has num_examples={update.num_examples}"
                )
        # the whole-round pass's order: the same updates give the same bits
        order = summation_order(
            [WeightedUpdate(u.path, u.num_examples, u.client_id) for u in self.updates]
        )
        updates = [self.updates[i] for i in order]
        with ExitStack() as stack:
            base = stack.enter_context(TensorReader(self.base))
            readers: list[UpdateReader] = []
            fds: list[int] = []
            for update in updates:
                reader, fd = self._open(update, base)
                readers.append(stack.enter_context(reader))
                fds.append(fd)  # the reader's own copy: open as long as the reader
            shape_of = {n: (s.dtype, s.shape) for n, s in base.specs.items()}
            writer = stack.enter_context(TensorWriter(self.out, shape_of, create=False))
            behind = WriteBehind(writer.handle)

            def ready(name: str, stop: int) -> None:
                for reader, fd in zip(readers, fds, strict=True):
                    self._wait(fd, reader.offset_of(name, stop))

            # the gate's first check, on the values as they are written: no pass of its own
            non_finite: list[str] = []
            write_weighted_mean(
                writer,
                base,
                readers,
                [u.num_examples for u in updates],
                ready=ready,
                wrote=behind.wrote,
                non_finite=non_finite,
            )
        if non_finite:
            self.non_finite = f"tensor {non_finite[0]!r} holds NaN or Inf values"

    def _open(self, update: ArrivingUpdate, base: TensorReader) -> tuple[UpdateReader, int]:
        """An :class:`UpdateReader` on the update's file, once its header has arrived.

        Returns the reader and its descriptor (a duplicate of the update's, which it closes).
        """
        fd = os.dup(update.fd)
        try:
            self._wait(fd, min(8, update.size))
            header_len = int.from_bytes(os.pread(fd, 8, 0), "little")
            # a header longer than the file is refused by the reader, not waited for
            self._wait(fd, min(8 + header_len, update.size))
        except BaseException:
            os.close(fd)
            raise
        try:
            # without a digest, UpdateReader hashes the base itself if the update is a delta
            reader = UpdateReader(
                update.path, base, self._base_digest, fd=fd, size=update.size, drop_cache=True
            )
        except (InvalidInputError, InconsistentUpdatesError) as exc:
            raise InconsistentUpdatesError(
                f"update from {update.client_id!r}: {exc.message}"
            ) from exc
        return reader, fd

    def _wait(self, fd: int, end: int) -> None:
        """Wait until the file open as ``fd`` holds ``end`` bytes."""
        while os.fstat(fd).st_size < end:
            if self._cancelled.wait(self._poll_s):
                raise StreamCancelledError("the streaming mean was cancelled")
        if self._cancelled.is_set():
            raise StreamCancelledError("the streaming mean was cancelled")
