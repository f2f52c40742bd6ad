"""Byzantine detection: the anomaly scores of each accepted update.

Three scores describe how an accepted update sits among the round's others:

- ``l2``: the L2 norm of its delta (update - base) over the floating-point tensors. A scaled
  or noised update is long.
- ``cosine``: the cosine similarity of its delta to the round's reference direction, the
  running mean of the updates accepted before it (:class:`RunningMean`; None for the round's
  first updates). A sign-flipped update points away.
- ``median_distance``: the L2 distance of its model to the coordinate-wise median of the
  round's models (whole-round strategies only, computed when the round has all its updates).

:class:`UpdateScorer` accumulates ``l2`` and ``cosine`` while an update streams, one tensor at
a time; :func:`score_update` does it for an update file. :func:`median_distances` makes the
third pass over a whole round. The rule that judges a round's scores is
:func:`~flctl.aggregation.find_outliers` (``_outliers.py``).

All sums are in float64, chunk by chunk, so scoring adds at most a few MiB to the tensors it
reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flctl.aggregation._fedmedian import coordinate_median
from flctl.tensors import TensorReader, UpdateReader, torch_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from flctl.aggregation._round import OpenRound
    from flctl.aggregation._strategy import WeightedUpdate

__all__ = [
    "AnomalyScores",
    "RunningMean",
    "UpdateScorer",
    "median_distances",
    "round_median_distances",
    "score_update",
]

#: Elements cast to float64 at a time: bounds the extra memory of a sum to a few MiB.
_CHUNK = 1 << 20
#: Updates a RunningMean holds before it gives a mean: the cosine to one or two updates says
#: more about them (the first may be an attacker's) than about the update being scored.
MIN_REFERENCE = 3


@dataclass(frozen=True)
class AnomalyScores:
    """The anomaly scores of one update.

    Attributes:
        l2: The L2 norm of the update's delta (update - base), over its floating-point tensors.
        cosine: Cosine similarity of the delta to the running mean of the round's deltas
            accepted before it, in [-1, 1]; None for the round's first update, or when either
            norm is 0.
        median_distance: L2 distance of the update's model to the round's coordinate-wise
            median; None until computed (whole-round strategies).
    """

    l2: float
    cosine: float | None = None
    median_distance: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """The scores as JSON-safe values (None kept, as JSON null)."""
        return {"l2": self.l2, "cosine": self.cosine, "median_distance": self.median_distance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnomalyScores:
        """Read back what :meth:`to_dict` wrote (a missing optional score is None).

        Raises:
            ValueError: ``l2`` is missing, or a score is not a finite number (or None).
        """
        if data.get("l2") is None:
            raise ValueError(f"anomaly scores need l2: {dict(data)!r}")
        return cls(
            l2=_number(data, "l2"),
            cosine=None if data.get("cosine") is None else _number(data, "cosine"),
            median_distance=(
                None if data.get("median_distance") is None else _number(data, "median_distance")
            ),
        )

    def with_median_distance(self, median_distance: float) -> AnomalyScores:
        """These scores with ``median_distance`` set."""
        return AnomalyScores(self.l2, self.cosine, _check_distance(median_distance))


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"anomaly score {key!r} must be a finite number, not {value!r}")
    return float(value)


def _check_distance(value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"median_distance must be finite and >= 0, not {value!r}")
    return float(value)


def _chunks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor``'s elements, flattened, in float64 slices of at most :data:`_CHUNK`."""
    import torch

    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK].to(torch.float64)


class UpdateScorer:
    """Accumulates one update's ``l2`` and ``cosine`` while it streams, tensor by tensor.

    Call :meth:`add` once per floating-point tensor with the update's delta and the running
    mean of the round's deltas accepted before this update (None for the round's first
    update), then :meth:`result`. Sums of squares and the dot product are accumulated in
    float64, a slice of at most 2^20 elements at a time.

    Example:
        ```python
        scorer = UpdateScorer()
        for name in float_tensors:
            scorer.add(update[name] - base[name], running.mean(name))
        scores = scorer.result()
        ```
    """

    def __init__(self) -> None:
        self._delta_sq = 0.0
        self._mean_sq = 0.0
        self._dot = 0.0
        self._with_mean = 0
        self._without_mean = 0

    def add(self, delta: torch.Tensor, running_mean: torch.Tensor | None) -> None:
        """Add one tensor of the update.

        Args:
            delta: The update's value minus the base's (float32 or float64).
            running_mean: The mean delta of the updates accepted before this one, same shape;
                None for the round's first update (then for every tensor of it).

        Raises:
            ValueError: ``delta`` is not floating-point, the mean's shape differs, or some
                tensors of the update came with a mean and others without.
        """
        if not delta.is_floating_point():
            raise ValueError(f"delta must be a floating-point tensor, not {delta.dtype}")
        if running_mean is None:
            self._without_mean += 1
        else:
            if running_mean.shape != delta.shape:
                raise ValueError(
                    f"running mean has shape {tuple(running_mean.shape)}, "
                    f"the delta {tuple(delta.shape)}"
                )
            self._with_mean += 1
        if self._with_mean and self._without_mean:
            raise ValueError("every tensor of an update needs a running mean, or none does")
        if running_mean is None:
            for d in _chunks(delta):
                self._delta_sq += float(d.dot(d))
            return
        for d, m in zip(_chunks(delta), _chunks(running_mean), strict=True):
            self._delta_sq += float(d.dot(d))
            self._mean_sq += float(m.dot(m))
            self._dot += float(d.dot(m))

    def result(self, median_distance: float | None = None) -> AnomalyScores:
        """The scores of the tensors added so far.

        Args:
            median_distance: The update's distance to the round's median, when known.

        Raises:
            ValueError: ``median_distance`` is negative or not finite.
        """
        cosine = None
        if self._with_mean and self._delta_sq > 0 and self._mean_sq > 0:
            raw = self._dot / math.sqrt(self._delta_sq * self._mean_sq)
            cosine = min(1.0, max(-1.0, raw))  # rounding may step just outside
        return AnomalyScores(
            l2=math.sqrt(self._delta_sq),
            cosine=cosine,
            median_distance=None if median_distance is None else _check_distance(median_distance),
        )


class RunningMean:
    """The round's reference direction: the mean of the accepted updates' deltas, as they come.

    :func:`score_update` adds each update's delta scaled to unit L2 norm (its direction), so
    that one long update (a scaled attack) counts as one vote and cannot turn the reference
    around for the updates after it; an update of norm 0 has no direction and adds nothing.
    :meth:`mean` is None until ``min_updates`` updates were added: the cosine to the mean of
    one or two updates says more about those updates (the first one may be an attacker's)
    than about the one being scored.

    Memory: one copy of the model's floating-point tensors, in the dtype of the deltas added
    (float32; float64 for float64 models). Not thread-safe: add one update at a time.

    Args:
        min_updates: Updates added before :meth:`mean` returns a mean (at least 1).
    """

    def __init__(self, min_updates: int = MIN_REFERENCE) -> None:
        if min_updates < 1:
            raise ValueError(f"min_updates must be at least 1, not {min_updates!r}")
        self.min_updates = min_updates
        self._means: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def mean(self, name: str) -> torch.Tensor | None:
        """The mean of tensor ``name``; None before ``min_updates`` updates were added."""
        if self._counts.get(name, 0) < self.min_updates:
            return None
        return self._means[name]

    def count(self, name: str) -> int:
        """How many updates' tensor ``name`` was added."""
        return self._counts.get(name, 0)

    def add(self, name: str, delta: torch.Tensor, weight: float = 1.0) -> None:
        """Add one update's tensor ``name`` with ``weight`` (1; or its examples).

        Raises:
            ValueError: ``weight`` is not positive, or the shape differs from earlier ones.
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, not {weight!r}")
        mean = self._means.get(name)
        if mean is None:
            self._means[name] = delta.detach().clone()
            self._weights[name] = float(weight)
            self._counts[name] = 1
            return
        if mean.shape != delta.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(delta.shape)}, earlier {tuple(mean.shape)}"
            )
        total = self._weights[name] + weight
        mean.add_(delta.to(mean.dtype) - mean, alpha=weight / total)
        self._weights[name] = total
        self._counts[name] += 1


def score_update(
    base: Path,
    update: Path,
    running: RunningMean | None = None,
    *,
    weight: float = 1.0,
    base_digest: str | None = None,
) -> AnomalyScores:
    """Score an update file against ``base`` and the round's running mean, then add it to it.

    Reads the base and the update one tensor at a time (any update encoding: full or delta,
    float32, float16 or bfloat16), twice when ``running`` is given: once to score the update
    against the mean of the updates before it, once to add its direction to the mean.
    Integer tensors are not scored.

    Args:
        base: The round's base model (safetensors).
        update: The accepted update (safetensors).
        running: The round's :class:`RunningMean`; this update's direction (its delta over its
            ``l2``) is added to it after the scores are taken. None: ``cosine`` is None.
        weight: This update's weight in the running mean: 1 (every update one vote, the
            default), or its capped examples.
        base_digest: The base's sha256, when known (a delta names its base: this saves hashing
            the base to check it).

    Returns:
        ``l2`` and ``cosine`` (None while the running mean holds fewer than its
        ``min_updates``); ``median_distance`` is None.

    Raises:
        InconsistentUpdatesError: The update does not match the base model.
    """
    scorer = UpdateScorer()
    with ExitStack() as stack:
        model = stack.enter_context(TensorReader(base))
        reader = stack.enter_context(UpdateReader(update, model, base_digest))
        names = [n for n, s in model.specs.items() if torch_dtype(s.dtype).is_floating_point]
        for name in names:
            delta = reader.read_delta(name)  # float32; float64 for float64 models
            scorer.add(delta, None if running is None else running.mean(name))
            del delta
        scores = scorer.result()
        if running is not None and scores.l2 > 0:
            for name in names:
                running.add(name, reader.read_delta(name).div_(scores.l2), weight)
    return scores


def _sum_squared_rows(block: torch.Tensor, center: torch.Tensor) -> list[float]:
    """Each row's sum of squared differences from ``center``, in float64."""
    import torch

    diff = block.to(torch.float64) - center.to(torch.float64)
    return [float(x) for x in diff.square_().sum(dim=1)]


def median_distances(opened: OpenRound) -> list[float]:
    """Each update's L2 distance to the round's coordinate-wise median model.

    Per floating-point tensor, the K updates are stacked (:meth:`OpenRound.stack`) and each
    coordinate's median taken exactly as :class:`~flctl.aggregation.FedMedian` takes it
    (:func:`~flctl.aggregation._fedmedian.coordinate_median`: for an even K, the mean of the
    two middle values, not ``torch.median``'s lower one), so a fedmedian round's distances are
    to the model it writes. The distance of the models equals that of the deltas (the base
    cancels out), up to rounding. Integer tensors are left out.

    Memory: the K x the largest tensor stack (float32; float64 for float64 models), plus a
    bounded workspace: the median is sorted over slices of at most 2^20 / K coordinates.

    Returns:
        The distances, in ``opened.updates`` order (client id order).
    """
    k = len(opened.updates)
    sums = [0.0] * k
    width = max(1, _CHUNK // max(k, 1))
    for name in opened.specs:
        if not opened.is_float(name):
            continue
        stacked = opened.stack(name).reshape(k, -1)
        for start in range(0, stacked.shape[1], width):
            block = stacked[:, start : start + width]
            for i, value in enumerate(_sum_squared_rows(block, coordinate_median(block))):
                sums[i] += value
        del stacked
    return [math.sqrt(s) for s in sums]


def round_median_distances(base: Path, updates: Sequence[WeightedUpdate]) -> dict[str, float]:
    """:func:`median_distances` of a round's update files, by client id.

    Args:
        base: The round's base model.
        updates: The round's accepted updates (each with its ``client_id``).

    Raises:
        NotEnoughUpdatesError: ``updates`` is empty.
        InconsistentUpdatesError: An update does not match the base model, or two updates
            have the same client id.
    """
    from flctl.aggregation._round import open_round
    from flctl.core.errors import InconsistentUpdatesError

    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids):
        raise InconsistentUpdatesError(f"two updates of one client in {sorted(ids)}")
    with ExitStack() as stack:
        opened = open_round(stack, base, updates)
        distances = median_distances(opened)
        return {u.client_id: d for u, d in zip(opened.updates, distances, strict=True)}
