"""FedAvg: the num_examples-weighted mean of client models, streamed tensor by tensor."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flctl.aggregation._strategy import Strategy, WeightedUpdate
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import read_spec

if TYPE_CHECKING:
    import torch

__all__ = ["FedAvg", "fedavg_in_memory"]


class FedAvg(Strategy):
    """Weighted average of the updates' parameters (McMahan et al., 2017).

    Floating-point tensors are averaged in float64 and cast back to the model's dtype;
    integer tensors (counters such as BatchNorm's ``num_batches_tracked``) take the value of the
    update with the most examples. Each tensor is read from each update's memory map, added to
    one accumulator and dropped, so peak memory is the output model plus one tensor.
    """

    name = "fedavg"

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the weighted mean of ``updates`` to ``out``; see :class:`Strategy`."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        if not updates:
            raise NotEnoughUpdatesError("no updates to aggregate")
        base_spec = read_spec(base)
        for update in updates:
            if update.num_examples <= 0:
                raise InconsistentUpdatesError(
                    f"update from {update.client_id or update.path.name!r} has "
                    f"num_examples={update.num_examples}"
                )
            spec = read_spec(update.path)
            if {n: (s.dtype, s.shape) for n, s in spec.items()} != {
                n: (s.dtype, s.shape) for n, s in base_spec.items()
            }:
                raise InconsistentUpdatesError(
                    f"update from {update.client_id or update.path.name!r} does not match the "
                    "model's tensor names, shapes or dtypes"
                )
        total = float(sum(u.num_examples for u in updates))
        heaviest = max(range(len(updates)), key=lambda i: updates[i].num_examples)
        result: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            handles: list[Any] = [
                stack.enter_context(safe_open(str(u.path), framework="pt")) for u in updates
            ]
            for name in base_spec:
                first = handles[0].get_tensor(name)
                if not first.is_floating_point():
                    result[name] = handles[heaviest].get_tensor(name).clone()
                    continue
                acc = torch.zeros(first.shape, dtype=torch.float64)
                del first
                for handle, update in zip(handles, updates, strict=True):
                    tensor = handle.get_tensor(name)
                    acc.add_(tensor.to(torch.float64), alpha=update.num_examples / total)
                    del tensor
                result[name] = acc.to(_torch_dtype(base_spec[name].dtype))
                del acc
        save_file(result, str(out))


def _torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
    }[st_dtype]


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
