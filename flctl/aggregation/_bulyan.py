"""Bulyan: Multi-Krum selection, then a trimmed mean around the coordinate-wise median."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from flctl.aggregation._fedmedian import coordinate_median
from flctl.aggregation._krum import krum_scores, lowest, pairwise_sq_distances
from flctl.aggregation._round import open_round
from flctl.aggregation._strategy import Param, Strategy, WeightedUpdate
from flctl.core.errors import NotEnoughUpdatesError

__all__ = ["Bulyan"]


class Bulyan(Strategy):
    """Bulyan (El Mhamdi et al. 2018): Krum's selection made robust coordinate by coordinate.

    With ``n`` updates of which ``f`` (``num_malicious``) may be Byzantine, and ``n >= 4f + 3``
    (a smaller round is refused):

    1. select ``theta = n - 2f`` updates: those with the lowest Krum scores (the sum of the
       squared L2 distances to the ``n - f - 2`` nearest other models);
    2. for each coordinate, take the median of the ``theta`` selected values, and the mean of
       the ``beta = theta - 2f`` values closest to it.

    Step 1 follows Flower: one Multi-Krum ranking over all ``n`` updates. The paper applies
    Krum ``theta`` times, each time to the updates not yet selected, which can pick a
    different set. Distances are over the floating-point tensors (see :class:`MultiKrum`).
    ``num_examples`` does not weigh in. Integer tensors come from the
    heaviest selected update. Ties go to the update first in client-id order.

    Memory: two passes over the updates. The first accumulates the n x n distance matrix one
    tensor name at a time (that tensor from all n updates: n x the largest tensor, float32);
    the second reads each tensor from the ``theta`` selected updates and sorts it: about
    3 x theta x the largest tensor.
    """

    name = "bulyan"
    writes_in_order = True
    summary = "Multi-Krum selection, then a trimmed mean around the median (robust)"
    params = (
        Param("num_malicious", 0, "f: updates that may be Byzantine (needs n >= 4f + 3)", low=0),
    )

    def __init__(self, num_malicious: int = 0) -> None:
        if num_malicious < 0:
            raise ValueError(f"num_malicious must be >= 0, not {num_malicious!r}")
        self.num_malicious = num_malicious
        #: The client ids of the updates the last round selected (empty before a round).
        self.last_selected: list[str] = []

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write Bulyan's aggregate of ``updates`` to ``out``; see :class:`Strategy`.

        Raises:
            NotEnoughUpdatesError: Fewer than ``4 * num_malicious + 3`` updates.
        """
        n, f = len(updates), self.num_malicious
        if n < 4 * f + 3:
            raise NotEnoughUpdatesError(
                f"bulyan with num_malicious={f} needs at least 4 * {f} + 3 = {4 * f + 3} "
                f"updates, and the round has {n} (lower num_malicious or wait for more updates)"
            )
        theta = n - 2 * f
        beta = theta - 2 * f
        with ExitStack() as stack:
            opened = open_round(stack, base, updates)
            selected = lowest(krum_scores(pairwise_sq_distances(opened), f), theta)
            writer = opened.writer(stack, out)
            for name in opened.specs:
                if not opened.is_float(name):
                    writer.write(name, opened.read(opened.heaviest(selected), name))
                    continue
                values = opened.stack(name, selected)
                median = coordinate_median(values)
                # stable: of two values as far from the median, the earlier update's is kept
                nearest = (values - median).abs_().sort(dim=0, stable=True).indices[:beta]
                result = values.gather(0, nearest).mean(dim=0)
                writer.write(name, result.to(opened.model_dtype(name)))
                del values, median, nearest, result
        self.last_selected = [opened.updates[i].client_id for i in selected]
