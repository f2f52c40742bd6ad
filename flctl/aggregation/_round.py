"""A round's updates opened for a strategy: checked, put in summation order, read by tensor."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.aggregation._strategy import WeightedUpdate
from flctl.aggregation._updates import open_updates, summation_order
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import TensorReader, TensorSpec, TensorWriter, UpdateReader, read_spec
from flctl.tensors import torch_dtype as _torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["OpenRound", "open_round"]


@dataclass
class OpenRound:
    """The base model and a round's updates, open for reading one tensor at a time.

    ``updates`` and ``readers`` are in :func:`~flctl.aggregation._updates.summation_order`, so
    an index names the same update whatever order the updates arrived in, and every tie
    (equal scores, equally heavy updates) is broken the same way on every run.
    """

    base: TensorReader
    specs: dict[str, TensorSpec]
    updates: list[WeightedUpdate]
    readers: list[UpdateReader]
    has_delta: bool

    def is_float(self, name: str) -> bool:
        """Whether tensor ``name`` is floating-point (integer tensors are counters)."""
        return bool(_torch_dtype(self.specs[name].dtype).is_floating_point)

    def model_dtype(self, name: str) -> torch.dtype:
        """The model's dtype of tensor ``name``."""
        return _torch_dtype(self.specs[name].dtype)

    def compute_dtype(self, name: str) -> torch.dtype:
        """Where a floating-point tensor is computed: float32, float64 for float64 models."""
        import torch

        return torch.float64 if self.model_dtype(name) == torch.float64 else torch.float32

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base model's tensor ``name`` (floating-point ones in the compute dtype)."""
        tensor = self.base.read(name)
        return tensor.to(self.compute_dtype(name)) if tensor.is_floating_point() else tensor

    def heaviest(self, indices: Sequence[int] | None = None) -> int:
        """The update with the most examples among ``indices`` (the first of equals)."""
        pool = range(len(self.updates)) if indices is None else indices
        return max(pool, key=lambda i: self.updates[i].num_examples)

    def read(self, index: int, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """Update ``index``'s value of ``name`` (floating-point ones in the compute dtype).

        Args:
            index: The update.
            name: The tensor.
            base: The base's tensor ``name`` in the compute dtype, when the caller has it.
        """
        if not self.is_float(name):
            return self.readers[index].read(name)
        if base is None and self.has_delta:
            base = self.base_tensor(name)
        return self.readers[index].read(name, dtype=self.compute_dtype(name), base_tensor=base)

    def stack(self, name: str, indices: Sequence[int] | None = None) -> torch.Tensor:
        """The updates' values of floating-point tensor ``name``, stacked on a first axis.

        Memory: one tensor of ``len(indices) x`` the tensor's size in the compute dtype, plus
        one tensor being read.
        """
        import torch

        pool = range(len(self.updates)) if indices is None else indices
        spec = self.specs[name]
        out = torch.empty((len(pool), *spec.shape), dtype=self.compute_dtype(name))
        base = self.base_tensor(name) if self.has_delta else None
        for row, index in enumerate(pool):
            out[row] = self.read(index, name, base)
        return out

    def weighted_mean(self, name: str, indices: Sequence[int] | None = None) -> torch.Tensor:
        """The num_examples-weighted mean of floating-point tensor ``name`` (as FedAvg).

        Summed in the round's order into one accumulator: memory is one accumulator plus one
        tensor being read.
        """
        import torch

        pool = list(range(len(self.updates)) if indices is None else indices)
        total = float(sum(self.updates[i].num_examples for i in pool))
        acc = torch.zeros(self.specs[name].shape, dtype=self.compute_dtype(name))
        base = self.base_tensor(name) if self.has_delta else None
        for index in pool:
            tensor = self.read(index, name, base)
            acc.add_(tensor, alpha=self.updates[index].num_examples / total)
            del tensor
        return acc

    def writer(self, stack: ExitStack, out: Path) -> TensorWriter:
        """Open the output file, with the base model's names, shapes and dtypes, on ``stack``."""
        shapes = {n: (s.dtype, s.shape) for n, s in self.specs.items()}
        return stack.enter_context(TensorWriter(out, shapes))


def open_round(stack: ExitStack, base: Path, updates: Sequence[WeightedUpdate]) -> OpenRound:
    """Check ``updates`` against ``base`` and open them on ``stack``, in summation order.

    Nothing is written: a strategy opens its output after this returns, so a refused round
    leaves no file behind.

    Raises:
        NotEnoughUpdatesError: ``updates`` is empty.
        InconsistentUpdatesError: An update has no examples or does not match ``base``.
    """
    if not updates:
        raise NotEnoughUpdatesError("no updates to aggregate")
    for update in updates:
        if update.num_examples <= 0:
            raise InconsistentUpdatesError(
                f"update from {update.client_id or update.path.name!r} has "
                f"num_examples={update.num_examples}"
            )
    ordered = [updates[i] for i in summation_order(updates)]
    specs = read_spec(base)
    base_reader = stack.enter_context(TensorReader(base))
    readers = open_updates(stack, base_reader, ordered)
    return OpenRound(
        base=base_reader,
        specs=dict(specs),
        updates=ordered,
        readers=readers,
        has_delta=any(reader.is_delta for reader in readers),
    )
