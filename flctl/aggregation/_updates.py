"""Opening a round's updates for a strategy, whatever their encoding."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from flctl.aggregation._strategy import WeightedUpdate
from flctl.core.errors import InconsistentUpdatesError, InvalidInputError
from flctl.tensors import TensorReader, UpdateEncoding, UpdateReader, read_metadata, sha256_file

__all__ = ["open_updates", "summation_order"]


def open_updates(
    stack: ExitStack,
    base: TensorReader,
    updates: Sequence[WeightedUpdate],
    *,
    drop_cache: bool = True,
) -> list[UpdateReader]:
    """Open an :class:`~flctl.tensors.UpdateReader` per update on ``stack``.

    Each update is checked against the base model in its own encoding before any output is
    written. The base's digest, which a delta must name, is hashed once, and only when some
    update is a delta.

    Each tensor is dropped from the page cache once read (``drop_cache``), unless the caller
    reads the update again soon.

    Raises:
        InconsistentUpdatesError: Naming the client whose update does not match the model, or
            is a delta from another model.
    """
    digest: str | None = None
    readers: list[UpdateReader] = []
    for update in updates:
        try:
            if digest is None:
                encoding = UpdateEncoding.from_metadata(read_metadata(update.path))
                if encoding.encoding == "delta":
                    digest = sha256_file(base.path)
            # an update is read once per pass, tensor by tensor: its pages need not stay cached
            reader = UpdateReader(update.path, base, digest, drop_cache=drop_cache)
            readers.append(stack.enter_context(reader))
        except (InvalidInputError, InconsistentUpdatesError) as exc:
            who = update.client_id or update.path.name
            raise InconsistentUpdatesError(f"update from {who!r}: {exc.message}") from exc
    return readers


def summation_order(updates: Sequence[WeightedUpdate]) -> list[int]:
    """Return the indices of ``updates`` in the order a strategy must add them up.

    Updates are handed to a strategy in the order they arrived, which changes from run to run,
    and floating-point addition is not associative: summed in arrival order, the same updates
    could give aggregates that differ in their last bits, and a seeded run would not repeat.
    Summing in this order (by client id, then by file: a blob's path names its digest) makes
    the aggregate a function of the updates alone. Ties, such as the heaviest update chosen for
    integer tensors, are broken in this order too.
    """
    return sorted(
        range(len(updates)),
        key=lambda i: (updates[i].client_id, str(updates[i].path), updates[i].num_examples),
    )
