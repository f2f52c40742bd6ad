"""DP-FedAvg with local noise: the coordinator averages deltas the clients already noised."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from flctl.aggregation._strategy import Strategy, WeightedUpdate
from flctl.aggregation._updates import open_updates, summation_order
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import TensorReader, TensorWriter, read_spec, torch_dtype

__all__ = ["LocalDpFedAvg"]


class LocalDpFedAvg(Strategy):
    """The unweighted mean of locally clipped and noised deltas, added to the base model.

    Each client clipped its delta to ``clip_norm`` and added Gaussian noise before upload
    (:func:`flctl.privacy.privatize_update`), so every update is already a private release and
    anything computed from the updates alone is too. The mean is therefore taken over the
    updates that arrived, with **equal weights**: weighting by ``num_examples``, which the
    clients report un-noised, would put that count into the model. Integer tensors (counters)
    are copied from the base model, never from a client.

    Every update must be a delta (``UpdateEncoding`` ``"delta"``): a full model cannot have
    been noised by flctl's client, and is refused with the client's name.

    Memory: one accumulator plus one tensor per update read at a time, as FedAvg. The deltas
    are summed in a fixed order (by client id), not in their arrival order, as FedAvg's are.

    :class:`~flctl.aggregation.PrivateStrategy` hands the model it writes to the configured
    strategy as the round's one update.
    """

    name = "local-dpfedavg"
    writes_in_order = True

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write ``base + mean of the noised deltas`` to ``out``; see :class:`Strategy`."""
        import torch

        if not updates:
            raise NotEnoughUpdatesError("no updates to aggregate")
        # a fixed order, not the arrival order: the same updates give the same bits
        updates = [updates[i] for i in summation_order(updates)]
        base_spec = read_spec(base)
        shape_of = {n: (s.dtype, s.shape) for n, s in base_spec.items()}
        with ExitStack() as stack:
            base_reader = stack.enter_context(TensorReader(base))
            readers = open_updates(stack, base_reader, updates)
            for reader, update in zip(readers, updates, strict=True):
                if not reader.is_delta:
                    who = update.client_id or update.path.name
                    raise InconsistentUpdatesError(
                        f"update from {who!r} is a full model: with local DP every update is "
                        "a delta its client clipped and noised"
                    )
            writer = stack.enter_context(TensorWriter(out, shape_of))
            for name, spec in base_spec.items():
                dtype = torch_dtype(spec.dtype)
                base_tensor = base_reader.read(name)
                if not dtype.is_floating_point:
                    writer.write(name, base_tensor)
                    continue
                acc = torch.zeros(spec.shape, dtype=torch.float64)
                for reader in readers:
                    delta = reader.read_delta(name, dtype=torch.float64)
                    acc.add_(delta)
                    del delta
                acc.div_(len(readers)).add_(base_tensor.to(torch.float64))
                writer.write(name, acc.to(dtype))
                del acc, base_tensor
