"""A round's updates taken one at a time as they are accepted: anomaly scores and running sum.

The round engine keeps one :class:`RunningSum` per round and hands it each update as soon as
the update is accepted, in a worker thread, while other clients still train or upload. Two
passes over the update, each reading it once (the page cache keeps it between them):

- :meth:`RunningSum.score` scores it (:class:`~flctl.aggregation.AnomalyScores`: the L2 norm
  of its delta, and its cosine to the round's reference direction, the mean of the unit
  directions of the updates accepted before it, from the fourth update on: see
  docs/strategies.md, Byzantine detection);
- :meth:`RunningSum.add` adds it, weighted by its examples, to the round's sum, for a strategy
  whose model depends on the updates only through their weighted mean
  (:attr:`Strategy.is_mean_based`: FedAvg, FedProx, the server optimizers) with ``[strategy]
  incremental = true``. When the wait ends, :meth:`RunningSum.settle` brings the sum to the
  round's final updates and weights (re-reading only what changed: an update left out, one
  added late, a weight lowered by ``max_weight_share``), and :meth:`RunningSum.write_mean`
  writes the mean, which the strategy turns into the next model
  (:meth:`Strategy.aggregate_mean`). For FedAvg the mean is the model.

An update's direction (its delta over its L2 norm) joins the reference when the next update is
scored, in that update's pass: it needs the update's norm, known only once the update was read.

Memory: the sum and the reference are kept in a scratch file (unlinked: it vanishes with the
process), read and written back one tensor at a time, so the process holds a few tensors the
size of the one being read, whatever the model's size; the page cache keeps the file where the
machine has room. Disk: two float32 copies of the model's floating-point tensors (float64 for
float64 models), one when the sum is not kept.

Numerics: the sum is kept in float32 (float64 for float64 models), each term rounded before it
is added, and divided by the total once. Updates are added in the order they arrive: two
updates give the same bits in either order, but with three or more the last bits of the mean
can depend on the order (within about K float32 ulps, relative). The whole-round pass of
:meth:`Strategy.aggregate` sums in a fixed order instead
(:func:`~flctl.aggregation._updates.summation_order`): ``[strategy] incremental = false``
chooses it where bit-for-bit repeatability across runs matters more than time.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from flctl.aggregation._anomaly import MIN_REFERENCE, AnomalyScores, UpdateScorer
from flctl.aggregation._strategy import WeightedUpdate
from flctl.aggregation._updates import open_updates, summation_order
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import TensorReader, TensorSpec, TensorWriter, read_spec, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["RunningSum", "SumOverflowError"]


class SumOverflowError(ArithmeticError):
    """The weighted sum left the float range (values near its limit): aggregate the round whole.

    The sum holds ``num_examples x value`` terms, where the whole-round mean adds
    ``num_examples / total x value`` terms that never exceed the largest value.
    """


def _key(update: WeightedUpdate) -> tuple[str, str]:
    return (update.client_id, str(update.path))


def _check_weight(update: WeightedUpdate) -> None:
    if update.num_examples <= 0:
        raise InconsistentUpdatesError(
            f"update from {update.client_id or update.path.name!r} has "
            f"num_examples={update.num_examples}"
        )


class RunningSum:
    """A round's updates onto one base model: their scores, and their weighted sum if kept.

    Args:
        base: The round's base model (safetensors).
        scratch: The folder of the scratch file (default: the system's temp folder).
        keep_sum: Keep the weighted sum (a mean-based strategy will aggregate from it); False:
            scores only.

    Not thread-safe: the engine hands it one update at a time (in a worker thread).
    """

    def __init__(self, base: Path, scratch: Path | None = None, *, keep_sum: bool = True) -> None:
        self.base = base
        self.keep_sum = keep_sum
        self._scratch_dir = scratch
        self._file: BinaryIO | None = None
        self._specs: dict[str, TensorSpec] = {}
        #: float tensor name -> (offset of its sum, offset of its reference) in the scratch file
        self._offsets: dict[str, tuple[int, int]] = {}
        #: the updates in the sum, with the weight each was added with
        self._added: dict[tuple[str, str], WeightedUpdate] = {}
        self.total = 0.0
        #: updates whose direction is in the reference
        self._directions = 0
        #: the last update scored, and its L2 norm: its direction joins the reference next
        self._pending: tuple[WeightedUpdate, float] | None = None
        self._scored: dict[tuple[str, str], AnomalyScores] = {}

    @property
    def added(self) -> list[WeightedUpdate]:
        """The updates in the sum, with their weights."""
        return list(self._added.values())

    def close(self) -> None:
        """Drop the scratch file (the sum is unusable afterwards)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def add(self, update: WeightedUpdate) -> None:
        """Add ``update`` to the sum with its weight (an update already in it is not added).

        Raises:
            InconsistentUpdatesError: The update does not match the base model, or has no
                weight. The sum is unusable afterwards (part of the update may be in it).
        """
        _check_weight(update)
        if not self.keep_sum:
            raise NotEnoughUpdatesError("this running sum keeps no sum (scores only)")
        if _key(update) in self._added:
            return
        self._pass(update, float(update.num_examples), None)
        self._added[_key(update)] = update
        self.total += update.num_examples

    def score(self, update: WeightedUpdate) -> AnomalyScores:
        """Score ``update`` against the updates scored before it (again: the same scores).

        Its direction joins the reference in the next update's pass.

        Raises:
            InconsistentUpdatesError: The update does not match the base model. The scores of
                later updates are unusable afterwards.
        """
        known = self._scored.get(_key(update))
        if known is not None:
            return known
        scorer = UpdateScorer()
        self._pass(update, 0.0, scorer)
        scores = scorer.result()
        self._scored[_key(update)] = scores
        self._pending = (update, scores.l2) if scores.l2 > 0 else None
        return scores

    def settle(self, final: Sequence[WeightedUpdate]) -> None:
        """Make the sum that of ``final`` (the round's updates, with their final weights).

        Updates in the sum but not in ``final`` are subtracted, those missing are added, and
        those whose weight changed are added again with the difference: only those files are
        read again.

        Raises:
            NotEnoughUpdatesError: ``final`` is empty.
            InconsistentUpdatesError: An update does not match the base model.
        """
        if not final:
            raise NotEnoughUpdatesError("no updates to aggregate")
        if not self.keep_sum:
            raise NotEnoughUpdatesError("this running sum keeps no sum (scores only)")
        wanted = {_key(u): u for u in final}
        for update in final:
            _check_weight(update)
        for key, update in list(self._added.items()):
            if key not in wanted:
                self._pass(update, -float(update.num_examples), None)
                self.total -= update.num_examples
                del self._added[key]
        for key, update in wanted.items():
            had = self._added.get(key)
            change = update.num_examples - (0 if had is None else had.num_examples)
            if change:
                self._pass(update, float(change), None)
                self.total += change
            self._added[key] = update

    def write_mean(self, out: Path) -> None:
        """Write the weighted mean of the sum's updates to ``out``, in the model's dtypes.

        This is FedAvg's model: integer tensors come from the update with the most examples
        (the first of equals in summation order), as in :class:`~flctl.aggregation.FedAvg`.

        Raises:
            NotEnoughUpdatesError: The sum holds no update.
            SumOverflowError: A value of the sum is not finite (the whole-round pass, which
                weighs before it adds, is the one to use); ``out`` may be partly written.
        """
        import torch

        updates = self.added
        if not updates or self.total <= 0 or not self.keep_sum:
            raise NotEnoughUpdatesError("no updates to aggregate")
        ordered = [updates[i] for i in summation_order(updates)]
        heaviest = max(range(len(ordered)), key=lambda i: ordered[i].num_examples)
        shapes = {n: (s.dtype, s.shape) for n, s in self._specs.items()}
        with ExitStack() as stack:
            base = stack.enter_context(TensorReader(self.base))
            reader = None
            writer = stack.enter_context(TensorWriter(out, shapes))
            for name, spec in self._specs.items():
                dtype = torch_dtype(spec.dtype)
                if not dtype.is_floating_point:
                    if reader is None:
                        (reader,) = open_updates(stack, base, [ordered[heaviest]])
                    writer.write(name, reader.read(name))
                    continue
                mean = self._read(self._offsets[name][0], spec).div_(self.total)
                if not bool(torch.isfinite(mean).all()):
                    raise SumOverflowError(f"the running sum of tensor {name!r} overflowed")
                writer.write(name, mean.to(dtype))
                del mean

    # ------------------------------------------------------------------ one pass

    def _open(self) -> int:
        """The scratch file's descriptor, laid out on first use."""
        if self._file is None:
            self._specs = dict(read_spec(self.base))
            offset = 0
            for name, spec in self._specs.items():
                dtype = torch_dtype(spec.dtype)
                if not dtype.is_floating_point:
                    continue
                size = _compute(dtype).itemsize * _numel(spec)
                self._offsets[name] = (offset, offset + size if self.keep_sum else offset)
                offset += size * (2 if self.keep_sum else 1)
            self._file = tempfile.TemporaryFile(prefix="flctl-round-", dir=self._scratch_dir)
            weakref.finalize(self, self._file.close)  # closed when the sum is dropped
            os.ftruncate(self._file.fileno(), offset)  # a sparse file of zeros
        return self._file.fileno()

    def _pass(self, update: WeightedUpdate, weight: float, scorer: UpdateScorer | None) -> None:
        """Read ``update`` once: score it (``scorer``) and add ``weight`` x it to the sum.

        When scoring, the previous update's direction joins the reference first, tensor by
        tensor in the same pass.
        """
        self._open()
        pending = self._pending if scorer is not None else None
        directions = self._directions + (1 if pending is not None else 0)
        with ExitStack() as stack:
            base = stack.enter_context(TensorReader(self.base))
            # the round reads its updates again (scores, the aggregate): keep them cached
            (reader,) = open_updates(stack, base, [update], drop_cache=False)
            before = None
            if pending is not None:
                (before,) = open_updates(stack, base, [pending[0]], drop_cache=False)
            for name, spec in self._specs.items():
                model_dtype = torch_dtype(spec.dtype)
                if not model_dtype.is_floating_point:
                    continue
                compute = _compute(model_dtype)
                sum_at, reference_at = self._offsets[name]
                base_tensor = None
                if scorer is not None or reader.is_delta:
                    base_tensor = base.read(name).to(compute)
                tensor = reader.read(name, dtype=compute, base_tensor=base_tensor)
                if scorer is not None:
                    assert base_tensor is not None
                    mean = None
                    if before is not None and pending is not None:
                        reference = self._read(reference_at, spec)
                        previous = before.read(name, dtype=compute, base_tensor=base_tensor)
                        reference.add_(previous.sub_(base_tensor).div_(pending[1]))
                        self._write(reference_at, reference)
                        mean = reference
                        del previous
                    if directions >= MIN_REFERENCE:
                        if mean is None:
                            mean = self._read(reference_at, spec)
                        mean = mean.div_(directions)
                    else:
                        mean = None
                    delta = tensor - base_tensor if weight else tensor.sub_(base_tensor)
                    scorer.add(delta, mean)
                    del delta
                    del mean
                if weight and self.keep_sum:
                    # the product rounded first, then the sum: each update's term is the same
                    # whatever came before it, so two updates give the same bits in either
                    # order (a fused multiply-add would round the two orders differently)
                    total = self._read(sum_at, spec).add_(tensor.mul_(weight))
                    self._write(sum_at, total)
                    del total
                del tensor, base_tensor
        if pending is not None:
            self._directions = directions
            self._pending = None

    def _read(self, offset: int, spec: TensorSpec) -> torch.Tensor:
        import torch

        assert self._file is not None
        out = torch.empty(_numel(spec), dtype=_compute(torch_dtype(spec.dtype)))
        view = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got <= 0:  # pragma: no cover - the file was laid out to its full size
                raise OSError(f"the running sum's scratch file ends at {offset + done}")
            done += got
        return out.reshape(tuple(spec.shape))

    def _write(self, offset: int, tensor: torch.Tensor) -> None:
        assert self._file is not None
        view = memoryview(tensor.contiguous().reshape(-1).numpy()).cast("B")  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], offset + done)


def _compute(dtype: torch.dtype) -> torch.dtype:
    """Where a floating-point tensor is summed: float32, float64 for float64 models."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _numel(spec: TensorSpec) -> int:
    count = 1
    for dim in spec.shape:
        count *= int(dim)
    return count
