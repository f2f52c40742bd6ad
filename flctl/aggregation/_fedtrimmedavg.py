"""FedTrimmedAvg: the coordinate-wise mean after trimming the extremes."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from flctl.aggregation._round import open_round
from flctl.aggregation._strategy import Param, Strategy, WeightedUpdate
from flctl.core.errors import NotEnoughUpdatesError

__all__ = ["FedTrimmedAvg"]


class FedTrimmedAvg(Strategy):
    """The coordinate-wise trimmed mean of the updates' models (Yin et al. 2018).

    For each coordinate, the K values are sorted, the ``int(beta * K)`` smallest and as many
    largest are dropped, and the rest are averaged (unweighted: ``num_examples`` does not weigh
    in). That many arbitrary updates cannot move a coordinate outside the range of the honest
    values. This is SciPy's ``trim_mean`` and Flower's FedTrimmedAvg (default ``beta`` 0.2).
    A round whose trimming would leave no value (``2 * int(beta * K) >= K``) is refused.
    Integer tensors come from the heaviest update, as in FedAvg.

    Memory: one tensor name at a time, read from all K updates and sorted: about
    2 x K x the largest tensor (float32; float64 for float64 models).
    """

    name = "fedtrimmedavg"
    writes_in_order = True
    summary = "coordinate-wise mean without the beta fraction at each end (robust)"
    params = (Param("beta", 0.2, "fraction trimmed from each end, in [0, 0.5]", low=0.0, high=0.5),)

    def __init__(self, beta: float = 0.2) -> None:
        if not 0.0 <= beta <= 0.5:
            raise ValueError(f"beta must be in [0, 0.5], not {beta!r}")
        self.beta = beta

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the coordinate-wise trimmed mean of ``updates``; see :class:`Strategy`.

        Raises:
            NotEnoughUpdatesError: No update, or too few to keep any after trimming.
        """
        k = len(updates)
        cut = int(self.beta * k)
        if k and 2 * cut >= k:
            raise NotEnoughUpdatesError(
                f"fedtrimmedavg with beta={self.beta!r} trims {cut} of {k} updates from each "
                "end, which leaves none to average (lower beta or wait for more updates)"
            )
        with ExitStack() as stack:
            opened = open_round(stack, base, updates)
            writer = opened.writer(stack, out)
            for name in opened.specs:
                if not opened.is_float(name):
                    writer.write(name, opened.read(opened.heaviest(), name))
                    continue
                ordered = opened.stack(name).sort(dim=0).values
                trimmed = ordered[cut : k - cut].mean(dim=0)
                writer.write(name, trimmed.to(opened.model_dtype(name)))
                del ordered, trimmed
