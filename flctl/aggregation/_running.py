"""Incremental aggregation: a round's weighted sum, added to as each update is accepted.

A strategy whose model depends on the updates only through their num_examples-weighted mean
(:attr:`Strategy.is_mean_based`: FedAvg, FedProx, the server optimizers) need not wait for the
last update to start aggregating. The round engine keeps a :class:`RunningSum` for the round
and adds each update to it as soon as the update is accepted, while other clients still train
or upload; when the wait ends, :meth:`RunningSum.settle` brings the sum to the round's final
set of updates and weights (re-reading only what changed: an update left out, one added late,
a weight lowered by ``max_weight_share``), and :meth:`RunningSum.write_mean` writes the mean,
which the strategy turns into the next model (:meth:`Strategy.aggregate_mean`). For FedAvg the
mean is the model: the last upload is followed by one write of the model, not by a pass over
every update.

Each update's anomaly scores (:class:`~flctl.aggregation.UpdateScorer`) are computed in the same
pass that adds it, against the running mean of the updates added before it.

Numerics: the sum is kept in float32 (float64 for float64 models), each update added with its
weight, and divided by the total once. Updates are added in the order they arrive; floating-
point addition being commutative, two updates give the same bits in either order, but with
three or more the last bits of the mean can depend on the order (within about K float32 ulps,
relative). The whole-round pass of :meth:`Strategy.aggregate` sums in a fixed order instead
(:func:`~flctl.aggregation._updates.summation_order`): ``[strategy] incremental = false``
chooses it where bit-for-bit repeatability across runs matters more than time.

Memory: one accumulator per floating-point tensor, the model's size in the compute dtype, for
the whole round; while an update is added, four tensors the size of the one being read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.aggregation._strategy import WeightedUpdate
from flctl.aggregation._updates import open_updates, summation_order
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import TensorReader, TensorSpec, TensorWriter, read_spec, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["RunningSum", "SumOverflowError"]

#: Called once per floating-point tensor of an update being added: (its delta from the base,
#: the running mean's delta of the updates added before it, or None for the first).
TensorObserver = Callable[["torch.Tensor", "torch.Tensor | None"], None]


class SumOverflowError(ArithmeticError):
    """The weighted sum left the float range (values near its limit): aggregate the round whole.

    The sum holds ``num_examples x value`` terms, where the whole-round mean adds
    ``num_examples / total x value`` terms that never exceed the largest value.
    """


def _key(update: WeightedUpdate) -> tuple[str, str]:
    return (update.client_id, str(update.path))


class RunningSum:
    """The weighted sum of a round's updates onto one base model, kept as updates arrive.

    Not thread-safe: the engine adds one update at a time (in a worker thread).
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self._spec_cache: dict[str, TensorSpec] | None = None
        self._acc: dict[str, torch.Tensor] = {}
        #: the updates in the sum, with the weight each was added with
        self._added: dict[tuple[str, str], WeightedUpdate] = {}
        self.total = 0.0

    @property
    def _specs(self) -> dict[str, TensorSpec]:
        # read with the first update, in the worker thread, not when the round opens
        if self._spec_cache is None:
            self._spec_cache = dict(read_spec(self.base))
        return self._spec_cache

    @property
    def added(self) -> list[WeightedUpdate]:
        """The updates in the sum, with their weights."""
        return list(self._added.values())

    def __contains__(self, update: WeightedUpdate) -> bool:
        return _key(update) in self._added

    def add(self, update: WeightedUpdate, observe: TensorObserver | None = None) -> None:
        """Add ``update`` with its weight (an update already in the sum is not added again).

        Args:
            update: The accepted update and its weight (> 0).
            observe: Called per floating-point tensor with the update's delta and the running
                mean's delta before this update (anomaly scores).

        Raises:
            InconsistentUpdatesError: The update does not match the base model, or has no
                weight. The sum is unusable afterwards (part of the update may be in it).
        """
        if _key(update) in self._added:
            return
        if update.num_examples <= 0:
            raise InconsistentUpdatesError(
                f"update from {update.client_id or update.path.name!r} has "
                f"num_examples={update.num_examples}"
            )
        self._apply(update, float(update.num_examples), observe)
        self._added[_key(update)] = update
        self.total += update.num_examples

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
        wanted = {_key(u): u for u in final}
        for key, update in list(self._added.items()):
            if key not in wanted:
                self._apply(update, -float(update.num_examples), None)
                self.total -= update.num_examples
                del self._added[key]
        for key, update in wanted.items():
            if update.num_examples <= 0:
                raise InconsistentUpdatesError(
                    f"update from {update.client_id or update.path.name!r} has "
                    f"num_examples={update.num_examples}"
                )
            had = self._added.get(key)
            change = update.num_examples - (0 if had is None else had.num_examples)
            if change:
                self._apply(update, float(change), None)
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
        if not updates or self.total <= 0:
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
                acc = self._acc.get(name)
                if acc is None:  # pragma: no cover - every float tensor was added
                    raise NotEnoughUpdatesError(f"tensor {name!r} was never added")
                mean = acc / self.total
                if not bool(torch.isfinite(mean).all()):
                    raise SumOverflowError(f"the running sum of tensor {name!r} overflowed")
                writer.write(name, mean.to(dtype))

    def _apply(self, update: WeightedUpdate, weight: float, observe: TensorObserver | None) -> None:
        import torch

        with ExitStack() as stack:
            base = stack.enter_context(TensorReader(self.base))
            (reader,) = open_updates(stack, base, [update])
            for name, spec in self._specs.items():
                dtype = torch_dtype(spec.dtype)
                if not dtype.is_floating_point:
                    continue
                compute = torch.float64 if dtype == torch.float64 else torch.float32
                need_base = reader.is_delta or observe is not None
                base_tensor = base.read(name).to(compute) if need_base else None
                tensor = reader.read(name, dtype=compute, base_tensor=base_tensor)
                acc = self._acc.get(name)
                if observe is not None:
                    assert base_tensor is not None
                    mean = None
                    if acc is not None and self.total > 0:
                        mean = acc / self.total - base_tensor
                    observe(tensor - base_tensor, mean)
                    del mean
                if acc is None:
                    acc = self._acc[name] = torch.zeros(spec.shape, dtype=compute)
                # the product rounded first, then the sum: each update's term is the same
                # whatever came before it, so two updates give the same bits in either order
                # (a fused multiply-add would round the two orders differently)
                acc.add_(tensor.mul_(weight))
                del tensor, base_tensor
