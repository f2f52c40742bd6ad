"""The validation gate: whether a round's aggregate may become the head (``[gate]``).

The round engine asks, in this order, once the aggregate exists (and, with central privacy,
once the round is charged to the ledger, since the noisy aggregate is released either way):

1. :func:`non_finite_tensors`: every floating-point value of the aggregate is finite. The
   aggregate of finite updates can still overflow (float16 weights, huge updates), and the
   evaluation of such a model means nothing, so it is not run.
2. :func:`check_metrics`: the round's metrics are finite and, with ``mode = "metric"``, the
   gate's metric has not regressed by more than ``max_regression`` against the reference
   version (:func:`reference_version`).

A :class:`Verdict` with a reason keeps the model from the head: the engine stores it as a
rejected version. :func:`rejected_streak` and :func:`best_version` serve the rollback policy
(``rollback_after``). docs/registry.md describes the behaviour users see.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flctl.core import GateConfig
from flctl.core.errors import InvalidInputError
from flctl.core.events import ModelRejected
from flctl.store import ModelRecord
from flctl.tensors import StreamValidator, read_spec

__all__ = [
    "Verdict",
    "best_version",
    "check_metrics",
    "metric_value",
    "non_finite_tensors",
    "reference_version",
    "rejected_streak",
]

#: Bytes read at a time by the finiteness check, so memory stays flat whatever the model.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Verdict:
    """What the gate decided about one aggregate.

    Attributes:
        reason: Why it was rejected, for the user; "" when it passed.
        check: The check that decided: ``finite`` or ``metric``.
        metric: The gate's metric, when metrics were compared (or missing).
        value: The aggregate's value of it.
        reference: The reference version's value.
        reference_version: The reference version.
    """

    reason: str = ""
    check: str = "finite"
    metric: str | None = None
    value: float | None = None
    reference: float | None = None
    reference_version: int | None = None

    @property
    def is_rejected(self) -> bool:
        """Whether the aggregate must not become the head."""
        return bool(self.reason)

    def rejected_event(
        self, model: ModelRecord, metrics: Mapping[str, float], gate: GateConfig
    ) -> ModelRejected:
        """The ``model.rejected`` event of the aggregate stored as ``model``.

        Args:
            model: The aggregate, stored with status rejected.
            metrics: Its finite metrics.
            gate: The gate's config (``against`` and ``max_regression``, when metrics were
                compared).
        """
        compared = self.check == "metric"
        return ModelRejected(
            version=model.version,
            digest=model.digest,
            parent=model.parent,
            metrics=metrics,
            reason=self.reason,
            check=self.check,
            metric=self.metric,
            value=self.value,
            reference=self.reference,
            reference_version=self.reference_version,
            against=gate.against if compared else None,
            max_regression=gate.max_regression if compared else None,
        )


def non_finite_tensors(path: Path) -> str:
    """Say why a safetensors file holds a NaN or an Inf, or "" when every value is finite.

    The file is read in 1 MiB pieces and each value checked on its bits (float64, float32,
    float16 and bfloat16), so memory does not grow with the model.

    Args:
        path: The aggregate's blob.

    Raises:
        InvalidInputError: The file is not a readable safetensors file.
    """
    specs = read_spec(path)
    validator = StreamValidator(specs, path.stat().st_size)
    try:
        with path.open("rb") as handle:
            while piece := handle.read(_CHUNK):
                validator.feed(piece)
        validator.finish()
    except InvalidInputError as exc:
        if "NaN or Inf" in exc.message:
            return exc.message
        raise
    return ""


def metric_value(model: ModelRecord, metric: str) -> float | None:
    """A version's value of ``metric``, or None when it has none (or it is not finite)."""
    value = model.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def best_version(models: Iterable[ModelRecord], metric: str, better: str) -> ModelRecord | None:
    """The version with the best ``metric`` among those not rejected, or None if none has it.

    Args:
        models: Candidate versions (rejected ones are skipped).
        metric: The metric to compare.
        better: ``higher`` or ``lower``: which way is better.

    Returns:
        On a tie the oldest: the version that produced those weights first (a rollback
        copies the metrics of the version it restores).
    """
    best: tuple[float, int] | None = None
    chosen: ModelRecord | None = None
    for model in models:
        value = metric_value(model, metric)
        if model.is_rejected or value is None:
            continue
        key = (value if better == "higher" else -value, -model.version)
        if best is None or key > best:
            best, chosen = key, model
    return chosen


def reference_version(
    gate: GateConfig, *, head: ModelRecord, models: Iterable[ModelRecord]
) -> ModelRecord | None:
    """The version a round's metric is compared with: the best one, or ``head``."""
    if gate.against == "head":
        return head
    return best_version(models, gate.metric, gate.better)


def check_metrics(
    gate: GateConfig, metrics: Mapping[str, float], reference: ModelRecord | None
) -> Verdict:
    """Judge a round's metrics: finite, and with ``mode = "metric"`` not regressed.

    Args:
        gate: The ``[gate]`` settings (``mode`` not ``off``).
        metrics: The round's metrics (server-side evaluation, or the clients' weighted ones).
        reference: The version to compare with (:func:`reference_version`); None, or one
            without the metric, means there is nothing to compare with and the check passes.

    Returns:
        The verdict; its reason names the numbers.
    """
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        return Verdict(f"evaluation returned non-finite metrics: {', '.join(bad)}")
    if gate.mode != "metric":
        return Verdict()
    name = gate.metric
    value = metrics.get(name)
    if value is None:
        has = ", ".join(sorted(metrics)) or "none"
        return Verdict(
            f"the round's metrics have no {name!r} to check (it has: {has})",
            check="metric",
            metric=name,
        )
    reference_value = None if reference is None else metric_value(reference, name)
    if reference is None or reference_value is None:
        return Verdict(check="metric", metric=name, value=value)
    regression = reference_value - value if gate.better == "higher" else value - reference_value
    verdict = Verdict(
        check="metric",
        metric=name,
        value=value,
        reference=reference_value,
        reference_version=reference.version,
    )
    if regression <= gate.max_regression:
        return verdict
    which = "the best version" if gate.against == "best" else "the head"
    return Verdict(
        f"{name} {value:.4f} is {regression:.4f} worse than {reference_value:.4f} of version "
        f"{reference.version} ({which}); max_regression is {gate.max_regression:g}",
        check=verdict.check,
        metric=verdict.metric,
        value=verdict.value,
        reference=verdict.reference,
        reference_version=verdict.reference_version,
    )


def rejected_streak(models: Iterable[ModelRecord], head: ModelRecord) -> list[ModelRecord]:
    """The rejected aggregates written since the head last moved, oldest first.

    Every move of the head (a committed round, a rollback, ``import --head``) writes a new
    version and points the head at it, so the rounds rejected in a row are exactly the
    rejected versions newer than the head.
    """
    return sorted(
        (m for m in models if m.is_rejected and m.version > head.version),
        key=lambda m: m.version,
    )
