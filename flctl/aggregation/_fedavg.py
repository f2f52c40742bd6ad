"""FedAvg: the num_examples-weighted mean of client models, streamed tensor by tensor."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.aggregation._strategy import Strategy, WeightedUpdate
from flctl.aggregation._updates import open_updates, summation_order
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import TensorReader, TensorWriter, UpdateReader, read_spec, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["PIECE_ELEMENTS", "FedAvg", "fedavg_in_memory", "pieces", "write_weighted_mean"]


class FedAvg(Strategy):
    """Weighted average of the updates' parameters (McMahan et al., 2017).

    Floating-point tensors are averaged in float32 (float64 for float64 models) and cast back
    to the model's dtype;
    integer tensors (counters such as BatchNorm's ``num_batches_tracked``) take the value of the
    update with the most examples. Each tensor is taken a piece at a time
    (:data:`PIECE_ELEMENTS`): the piece is read from each update with ``pread`` (no memory map
    that would keep K models resident), added to one accumulator and dropped, and the result
    is written piece by piece: peak memory is one accumulator plus one piece (4 MiB each),
    whatever the number of clients or the size of the tensors.

    Updates may come in any encoding (:class:`flctl.tensors.UpdateEncoding`): each is read back
    as the client's values (base + delta for a delta, in float32 from half precision), so the
    average is that of the models the clients trained, up to the encoding's rounding. When
    some update is a delta, the base is read once per piece and shared.

    The result does not depend on the order of ``updates``: they are summed in order of client
    id (then file), not of arrival, so a seeded run gives the same model, bit for bit, however
    its updates arrived; of two equally heavy updates, an integer tensor comes from the first in
    that order.
    """

    name = "fedavg"
    summary = "weighted mean of the clients' models (McMahan et al. 2017)"
    is_mean_based = True
    writes_in_order = True

    def aggregate_mean(self, base: Path, mean: Path, out: Path) -> None:
        """The mean is FedAvg's model: ``mean`` is moved to ``out``."""
        os.replace(mean, out)

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the weighted mean of ``updates`` to ``out``; see :class:`Strategy`."""
        if not updates:
            raise NotEnoughUpdatesError("no updates to aggregate")
        base_spec = read_spec(base)
        shape_of = {n: (s.dtype, s.shape) for n, s in base_spec.items()}
        for update in updates:
            if update.num_examples <= 0:
                raise InconsistentUpdatesError(
                    f"update from {update.client_id or update.path.name!r} has "
                    f"num_examples={update.num_examples}"
                )
        # a fixed order, not the arrival order: the same updates give the same bits
        updates = [updates[i] for i in summation_order(updates)]
        with ExitStack() as stack:
            base_reader = stack.enter_context(TensorReader(base))
            # every update is checked against the model before the output file exists
            readers = open_updates(stack, base_reader, updates)
            writer = stack.enter_context(TensorWriter(out, shape_of))
            write_weighted_mean(writer, base_reader, readers, [u.num_examples for u in updates])


#: Elements of a tensor FedAvg reads, sums and writes at a time (4 MiB of float32).
PIECE_ELEMENTS = 1 << 20


def pieces(numel: int) -> Iterator[tuple[int, int]]:
    """The ``(start, stop)`` element ranges FedAvg takes a tensor of ``numel`` elements in.

    An empty tensor is one empty piece.
    """
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, PIECE_ELEMENTS):
        yield start, min(start + PIECE_ELEMENTS, numel)


def write_weighted_mean(
    writer: TensorWriter,
    base: TensorReader,
    readers: Sequence[UpdateReader],
    weights: Sequence[int],
    *,
    ready: Callable[[str, int], None] | None = None,
    wrote: Callable[[int], None] | None = None,
    non_finite: list[str] | None = None,
) -> None:
    """Write FedAvg's model: the ``weights``-weighted mean of ``readers``, piece by piece.

    The one computation of FedAvg's model, whether the updates are on disk
    (:meth:`FedAvg.aggregate`) or still arriving (:class:`~flctl.aggregation.StreamingMean`):
    the same updates in the same order give the same bits either way. Each floating-point
    tensor is taken :data:`PIECE_ELEMENTS` at a time: the piece of every update is added,
    weighted, to a float32 accumulator (float64 for float64 models) and written in the model's
    dtype. Integer tensors come from the heaviest update (the first of equals).

    Args:
        writer: The output, its tensors declared in the base model's order.
        base: The round's base model.
        readers: The updates, in summation order (:func:`summation_order`).
        weights: Each update's weight (its examples, as counted), > 0.
        ready: Called with a tensor's name and the end of a piece before the piece is read
            (waits until every update holds it).
        wrote: Called with the bytes of each piece written.
        non_finite: Given, the names of the floating-point tensors written with a NaN or an
            Inf are appended to it (once each, in the order written).
    """
    import torch

    total = float(sum(weights))
    heaviest = max(range(len(readers)), key=lambda i: weights[i])
    has_delta = any(reader.is_delta for reader in readers)
    for name, spec in base.specs.items():
        dtype = torch_dtype(spec.dtype)
        # float32 accumulation: 13x faster than float64 here, and a weighted mean of K terms
        # loses at most about K float32 ulps; float64 models keep float64
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for start, stop in pieces(spec.numel):
            if ready is not None:
                ready(name, stop)
            if not dtype.is_floating_point:
                piece = readers[heaviest].read_piece(name, start, stop)
            else:
                acc = torch.zeros(stop - start, dtype=acc_dtype)
                base_piece = base.read_piece(name, start, stop).to(acc_dtype) if has_delta else None
                for reader, weight in zip(readers, weights, strict=True):
                    value = reader.read_piece(
                        name, start, stop, dtype=acc_dtype, base_piece=base_piece
                    )
                    acc.add_(value, alpha=weight / total)
                    del value
                piece = acc.to(dtype)
                del acc, base_piece
                if non_finite is not None and name not in non_finite and not _finite(piece):
                    non_finite.append(name)
            writer.write_part(name, piece)
            if wrote is not None:
                wrote(piece.numel() * piece.element_size())
            del piece


def _finite(piece: torch.Tensor) -> bool:
    """Whether every value of a floating-point ``piece`` is finite.

    Its sum first (15x cheaper than testing each value): a NaN or an Inf anywhere makes the sum
    NaN or Inf, so a finite sum settles it. A sum that overflowed (large finite values) is
    followed by the test of each value. Half-precision pieces are summed in float32.
    """
    import torch

    total = piece.sum(dtype=torch.float32 if piece.element_size() < 4 else None)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(piece).all())


def fedavg_in_memory(
    models: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Reference FedAvg over state dicts held in memory (tests compare the streaming path to it)."""
    import torch

    if not models:
        raise NotEnoughUpdatesError("no updates to aggregate")
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            heaviest = max(range(len(models)), key=lambda i: weights[i])
            out[name] = models[heaviest][name].clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for model, weight in zip(models, weights, strict=True):
            acc += model[name].to(torch.float64) * (weight / total)
        out[name] = acc.to(first.dtype)
    return out
