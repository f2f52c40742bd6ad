"""FedMedian: the coordinate-wise median of the clients' models."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.aggregation._round import open_round
from flctl.aggregation._strategy import Strategy, WeightedUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["FedMedian", "coordinate_median"]


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """The median over the first axis; of an even count, the mean of the two middle values.

    (``torch.median`` would return the lower of the two; NumPy and Flower take their mean.)
    """
    k = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if k % 2:
        return ordered[k // 2].clone()
    return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class FedMedian(Strategy):
    """The coordinate-wise median of the updates' models (Yin et al. 2018).

    Each coordinate of the next model is the median of that coordinate over the K updates;
    for an even K, the mean of the two middle values (NumPy's and Flower's convention).
    ``num_examples`` does not weigh in. Up to ``(K - 1) // 2`` of the K updates may be
    arbitrary without moving a coordinate outside the range of the honest values. Integer
    tensors come from the heaviest update, as in FedAvg.

    Memory: one tensor name at a time, read from all K updates and sorted: about
    2 x K x the largest tensor (float32; float64 for float64 models).
    """

    name = "fedmedian"
    writes_in_order = True
    summary = "coordinate-wise median of the clients' models (robust)"

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the coordinate-wise median of ``updates`` to ``out``; see :class:`Strategy`."""
        with ExitStack() as stack:
            opened = open_round(stack, base, updates)
            writer = opened.writer(stack, out)
            for name in opened.specs:
                if not opened.is_float(name):
                    writer.write(name, opened.read(opened.heaviest(), name))
                    continue
                median = coordinate_median(opened.stack(name))
                writer.write(name, median.to(opened.model_dtype(name)))
                del median
