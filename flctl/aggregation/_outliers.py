"""The outlier rule of Byzantine detection: Iglewicz and Hoaglin's modified z-score.

:func:`find_outliers` judges a round's :class:`~flctl.aggregation.AnomalyScores` (one per
accepted update) and says which updates stand out, and why (:class:`Outlier`). The
coordinator records them (``exclude_outliers = "flag"``) or also leaves them out of the
aggregate (``"drop"``); docs/strategies.md, "Byzantine detection", states the rule.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flctl.aggregation._anomaly import AnomalyScores

__all__ = [
    "COSINE_FLOOR",
    "DEFAULT_THRESHOLD",
    "MIN_UPDATES",
    "Outlier",
    "RELATIVE_FLOOR",
    "find_outliers",
    "robust_z_scores",
]

#: Iglewicz and Hoaglin's constant: 0.6745 * (x - median) / MAD is a z-score for normal data.
_MAD_SCALE = 0.6745
#: The mean absolute deviation's factor (sqrt(pi / 2)) when the MAD is 0.
_MEAN_AD_SCALE = 1.2533
#: A spread below this fraction of the median is float rounding, not a spread.
_RTOL = 1e-9
#: Fewer updates than this have no outliers: a median of two values says nothing.
MIN_UPDATES = 3
#: Iglewicz and Hoaglin's recommended threshold on |z|.
DEFAULT_THRESHOLD = 3.5
#: The least spread of l2 and median_distance, relative to their median.
RELATIVE_FLOOR = 0.2
#: The least spread of cosine.
COSINE_FLOOR = 0.1

ScoreName = Literal["l2", "cosine", "median_distance"]


@dataclass(frozen=True)
class Outlier:
    """Why :func:`find_outliers` marked an update.

    Attributes:
        score: The score that tripped: ``l2``, ``median_distance`` (too large) or ``cosine``
            (too small).
        value: The update's value of that score.
        z: Its modified z-score among the round's updates (the largest in magnitude when
            several scores tripped).
        threshold: The threshold it crossed (``z > threshold``; ``z < -threshold`` for cosine).
    """

    score: ScoreName
    value: float
    z: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """As the ``update.excluded`` event's data (without ``mode``)."""
        return {"score": self.score, "value": self.value, "z": self.z, "threshold": self.threshold}

    @property
    def reason(self) -> str:
        """One line for a table or a log: ``l2 12.5 (z 8.1 > 3.5)``."""
        sign = "<" if self.z < 0 else ">"
        bound = -self.threshold if self.z < 0 else self.threshold
        return f"{self.score} {self.value:.4g} (z {self.z:.2f} {sign} {bound:g})"


#: Each score, and the side on which it is suspicious (+1: too large, -1: too small).
_RULES: tuple[tuple[ScoreName, int], ...] = (("l2", 1), ("median_distance", 1), ("cosine", -1))


def robust_z_scores(values: Sequence[float], floor: float = 0.0) -> list[float] | None:
    """Iglewicz and Hoaglin's modified z-scores: ``0.6745 * (x - median) / MAD``.

    That is ``(x - median) / s`` with ``s = MAD / 0.6745`` (the standard deviation, for
    normal data). With a MAD of 0 (more than half the values equal) ``s`` is the mean absolute
    deviation from the median x 1.2533 instead. ``s`` is at least ``floor``, and a spread
    below 1e-9 x the median's magnitude counts as 0 (float rounding, not a spread).

    Args:
        values: The round's values of one score.
        floor: The least spread ``s`` (0: none).

    Returns:
        One z per value, or None when there is no spread at all (nothing stands out).
    """
    med = statistics.median(values)
    deviations = [abs(v - med) for v in values]
    rounding = _RTOL * abs(med)
    mad = statistics.median(deviations)
    if mad > rounding:
        spread = mad / _MAD_SCALE
    else:
        mean_ad = statistics.fmean(deviations)
        spread = _MEAN_AD_SCALE * mean_ad if mean_ad > rounding else 0.0
    spread = max(spread, floor)
    if spread <= 0:
        return None
    return [(v - med) / spread for v in values]


def find_outliers(
    scores: Mapping[str, AnomalyScores],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    relative_floor: float = RELATIVE_FLOOR,
    cosine_floor: float = COSINE_FLOOR,
) -> dict[str, Outlier]:
    """The round's outliers by the modified z-score rule, by client id.

    Each score is judged over the updates that have it, with Iglewicz and Hoaglin's modified
    z-score (:func:`robust_z_scores`): ``l2`` and ``median_distance`` are suspicious when
    ``z > threshold``, ``cosine`` when ``z < -threshold``. An update is an outlier on its
    score of largest ``|z|`` that trips.

    The spread a z is measured in is at least ``relative_floor`` x the median for ``l2`` and
    ``median_distance``, and ``cosine_floor`` for ``cosine``. Without it, a round of very
    alike updates (whose spread is tiny) would make an honest update that differs by a few
    percent an outlier; with the defaults and ``threshold = 3.5``, an ``l2`` or a distance
    must be above 1.7 x the round's median, a cosine 0.35 below its median.

    Edge cases:

    - fewer than 3 updates in the round: none is an outlier (nor on a score that fewer than
      3 updates have);
    - a score whose MAD is 0 (more than half the values equal) falls back to the mean
      absolute deviation x 1.2533; when there is no spread at all, the score marks nothing;
    - at most ``(K - 1) // 2`` of the K updates are outliers, those of largest ``|z|`` (ties:
      client id order), so that a majority of the round always remains.

    Args:
        scores: Client id -> its update's scores (the round's accepted updates).
        threshold: The |z| beyond which a score is an outlier (3.5: Iglewicz and Hoaglin's).
        relative_floor: The least spread of ``l2`` and ``median_distance``, relative to
            their median.
        cosine_floor: The least spread of ``cosine``.

    Returns:
        Client id -> why, in client id order; empty when nothing stands out.

    Raises:
        ValueError: ``threshold`` is not a positive finite number, or a floor is negative.
    """
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, not {threshold!r}")
    if not (relative_floor >= 0 and cosine_floor >= 0):
        raise ValueError(f"floors must be >= 0, not {relative_floor!r}, {cosine_floor!r}")
    if len(scores) < MIN_UPDATES:
        return {}
    worst: dict[str, Outlier] = {}
    for score, side in _RULES:
        having = {c: getattr(s, score) for c, s in scores.items() if getattr(s, score) is not None}
        if len(having) < MIN_UPDATES:
            continue
        values = list(having.values())
        floor = (
            cosine_floor if score == "cosine" else relative_floor * abs(statistics.median(values))
        )
        zs = robust_z_scores(values, floor)
        if zs is None:
            continue
        for (client, value), z in zip(having.items(), zs, strict=True):
            if side * z > threshold and (client not in worst or abs(z) > abs(worst[client].z)):
                worst[client] = Outlier(score, float(value), z, threshold)
    cap = (len(scores) - 1) // 2
    kept = sorted(worst, key=lambda c: (-abs(worst[c].z), c))[:cap]
    return {c: worst[c] for c in sorted(kept)}
