"""Krum and Multi-Krum: keep the updates closest to their neighbours, drop the outliers."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from flctl.aggregation._round import OpenRound, open_round
from flctl.aggregation._strategy import Param, Strategy, WeightedUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["Krum", "MultiKrum", "krum_scores", "pairwise_sq_distances"]


def pairwise_sq_distances(opened: OpenRound) -> torch.Tensor:
    """The K x K matrix of squared L2 distances between the updates' models (float64).

    Over the floating-point tensors only: integer tensors are counters (BatchNorm's
    ``num_batches_tracked`` counts a client's batches), not parameters, and would make the
    clients with the most data look the farthest apart. Accumulated one tensor name at a time:
    memory is that tensor read from all K updates plus one difference.
    """
    import torch

    k = len(opened.updates)
    distances = torch.zeros((k, k), dtype=torch.float64)
    for name in opened.specs:
        if not opened.is_float(name):
            continue
        stacked = opened.stack(name)
        flat = stacked.reshape(k, -1)
        for i in range(k):
            for j in range(i + 1, k):
                diff = (flat[i] - flat[j]).to(torch.float64)
                d = float(torch.dot(diff, diff))
                distances[i, j] += d
                distances[j, i] += d
        del stacked, flat
    return distances


def krum_scores(distances: torch.Tensor, num_malicious: int) -> list[float]:
    """Each update's Krum score: the sum of its squared distances to its closest neighbours.

    The neighbours are the ``max(1, K - num_malicious - 2)`` updates nearest to it (itself
    excluded; fewer when there are not that many others).
    """
    k = distances.shape[0]
    closest = max(1, k - num_malicious - 2)
    scores = []
    for i in range(k):
        others = [float(distances[i, j]) for j in range(k) if j != i]
        scores.append(sum(sorted(others)[:closest]))
    return scores


def lowest(scores: Sequence[float], count: int) -> list[int]:
    """The indices of the ``count`` lowest scores, in index order (ties: the lower index)."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[:count])


class MultiKrum(Strategy):
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): average the m best-scored.

    Each update's score is the sum of the squared L2 distances from its model to the
    ``n - f - 2`` nearest other models (``f`` = ``num_malicious``; at least 1 neighbour); the
    ``to_keep`` updates with the lowest scores are averaged, weighted by num_examples, as
    FedAvg does. ``to_keep`` 1 is Krum. With ``n > 2f + 2`` the selection provably resists
    ``f`` Byzantine updates; fewer updates are aggregated all the same, as Flower does (its
    MultiKrum defaults: ``num_malicious`` 0, ``to_keep`` 1). A ``to_keep`` larger than the
    round keeps every update; keeping more than ``n - f`` may keep a Byzantine one.
    Distances are over the floating-point tensors: Flower counts
    integer tensors too, but counters such as BatchNorm's ``num_batches_tracked`` grow with a
    client's data and would dominate them. Integer tensors of the result come from the
    heaviest kept update. Ties in
    score go to the update first in client-id order.

    Memory: two passes over the updates. The first accumulates the K x K distance matrix one
    tensor name at a time (that tensor from all K updates: K x the largest tensor, float32);
    the second writes the result (one accumulator plus one tensor being read).
    """

    name = "multikrum"
    writes_in_order = True
    summary = "average of the to_keep updates nearest their neighbours (robust)"
    params: ClassVar[tuple[Param, ...]] = (
        Param("num_malicious", 0, "f: how many updates may be Byzantine", low=0),
        Param("to_keep", 1, "m: how many of the best-scored updates are averaged", low=1),
    )

    def __init__(self, num_malicious: int = 0, to_keep: int = 1) -> None:
        if num_malicious < 0:
            raise ValueError(f"num_malicious must be >= 0, not {num_malicious!r}")
        if to_keep < 1:
            raise ValueError(f"to_keep must be >= 1, not {to_keep!r}")
        self.num_malicious = num_malicious
        self.to_keep = to_keep
        #: The client ids of the updates the last round kept (empty before a round).
        self.last_selected: list[str] = []

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the mean of the ``to_keep`` best-scored updates; see :class:`Strategy`."""
        with ExitStack() as stack:
            opened = open_round(stack, base, updates)
            scores = krum_scores(pairwise_sq_distances(opened), self.num_malicious)
            kept = lowest(scores, self.to_keep)
            writer = opened.writer(stack, out)
            for name in opened.specs:
                if not opened.is_float(name):
                    writer.write(name, opened.read(opened.heaviest(kept), name))
                    continue
                mean = opened.weighted_mean(name, kept)
                writer.write(name, mean.to(opened.model_dtype(name)))
                del mean
        self.last_selected = [opened.updates[i].client_id for i in kept]


class Krum(MultiKrum):
    """Krum (Blanchard et al. 2017): the one update nearest its neighbours becomes the model.

    Multi-Krum with ``to_keep`` 1: the update whose model has the lowest score (the sum of the
    squared L2 distances to its ``n - f - 2`` nearest other models, ``f`` = ``num_malicious``)
    is the next model, as it is (its tensors in the model's dtypes). With ``n > 2f + 2`` the
    choice provably resists ``f`` Byzantine updates; see :class:`MultiKrum` for the rest
    (smaller rounds, ties, integer tensors).

    Memory: as Multi-Krum: K x the largest tensor while the distances are accumulated, one
    tensor while the chosen update is copied.
    """

    name = "krum"
    summary = "the one update nearest its neighbours (robust)"
    params = (Param("num_malicious", 0, "f: how many updates may be Byzantine", low=0),)

    def __init__(self, num_malicious: int = 0) -> None:
        super().__init__(num_malicious=num_malicious, to_keep=1)
