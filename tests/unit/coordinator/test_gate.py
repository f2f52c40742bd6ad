"""The validation gate's checks, on real safetensors files and model records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flctl.coordinator._gate import (
    Verdict,
    best_version,
    check_metrics,
    non_finite_tensors,
    reference_version,
    rejected_streak,
)
from flctl.core import GateConfig
from flctl.core.errors import InvalidInputError
from flctl.store import ModelRecord
from flctl.tensors import save_parameters


def model(version: int, status: str = "ok", **metrics: float) -> ModelRecord:
    return ModelRecord(
        version=version,
        digest=f"{version:064x}",
        parent=version - 1 or None,
        server_round=version - 1 or None,
        kind="aggregate" if version > 1 else "initial",
        metrics=dict(metrics),
        created=float(version),
        status=status,
    )


def gate(**values: Any) -> GateConfig:
    return GateConfig(**{"mode": "metric", **values})


# -- finiteness of the aggregate, read from its file ----------------------------------------


def test_a_finite_model_passes(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_parameters({"w": torch.randn(300, 300), "b": torch.zeros(3)}, path)
    assert non_finite_tensors(path) == ""


@pytest.mark.parametrize(
    ("tensor", "name"),
    [
        (torch.tensor([1.0, float("inf")]), "b"),
        (torch.tensor([float("nan")], dtype=torch.float64), "b"),
        # finite float32 values that overflow when the aggregate is held in float16
        (torch.tensor([60000.0, 60000.0]).to(torch.float16) * 2, "b"),
        (torch.tensor([float("nan")], dtype=torch.bfloat16), "b"),
    ],
    ids=["f32-inf", "f64-nan", "f16-overflow", "bf16-nan"],
)
def test_nan_or_inf_anywhere_is_named(tmp_path: Path, tensor: torch.Tensor, name: str) -> None:
    path = tmp_path / "bad.safetensors"
    # a first tensor larger than the 1 MiB read, so the bad one arrives in a later piece
    save_parameters({"a": torch.ones(600, 600), name: tensor}, path)
    assert non_finite_tensors(path) == f"tensor {name!r} holds NaN or Inf values"


def test_a_file_that_is_not_safetensors_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10" * 64)
    with pytest.raises(InvalidInputError):
        non_finite_tensors(path)


# -- metrics --------------------------------------------------------------------------------


def test_non_finite_metrics_are_rejected_even_with_mode_finite() -> None:
    verdict = check_metrics(
        GateConfig(mode="finite"), {"loss": float("nan"), "accuracy": 0.5}, None
    )
    assert verdict.is_rejected
    assert verdict.reason == "evaluation returned non-finite metrics: loss"
    # mode "finite" does not compare: a big regression passes
    regressed = check_metrics(GateConfig(mode="finite"), {"accuracy": 0.0}, model(2, accuracy=1))
    assert not regressed.is_rejected


def test_regression_beyond_the_threshold_is_rejected_with_the_numbers() -> None:
    reference = model(3, accuracy=0.9)
    verdict = check_metrics(gate(max_regression=0.1), {"accuracy": 0.7}, reference)
    assert verdict.is_rejected
    assert verdict.reason == (
        "accuracy 0.7000 is 0.2000 worse than 0.9000 of version 3 (the best version); "
        "max_regression is 0.1"
    )
    assert (verdict.value, verdict.reference, verdict.reference_version) == (0.7, 0.9, 3)
    data = verdict.rejected_event(model(4), {"accuracy": 0.7}, gate(max_regression=0.1)).to_data()
    assert data == {
        "version": 4,
        "digest": model(4).digest,
        "parent": model(4).parent,
        "metrics": {"accuracy": 0.7},
        "reason": verdict.reason,
        "check": "metric",
        "metric": "accuracy",
        "value": 0.7,
        "reference": 0.9,
        "reference_version": 3,
        "against": "best",
        "max_regression": 0.1,
    }


def test_a_rejection_without_compared_metrics_has_null_gate_fields() -> None:
    event = Verdict("NaN in weight").rejected_event(model(4), {}, gate(max_regression=0.1))
    assert event.to_data() == {
        "version": 4,
        "digest": model(4).digest,
        "parent": 3,
        "metrics": {},
        "reason": "NaN in weight",
        "check": "finite",
        "metric": None,
        "value": None,
        "reference": None,
        "reference_version": None,
        "against": None,
        "max_regression": None,
    }


def test_regression_within_the_threshold_or_an_improvement_passes() -> None:
    reference = model(3, accuracy=0.9)
    assert not check_metrics(gate(max_regression=0.1), {"accuracy": 0.85}, reference).is_rejected
    assert not check_metrics(gate(), {"accuracy": 0.9}, reference).is_rejected
    assert not check_metrics(gate(), {"accuracy": 0.95}, reference).is_rejected
    assert check_metrics(gate(), {"accuracy": 0.8999}, reference).is_rejected


def test_lower_is_better_for_a_loss() -> None:
    reference = model(2, loss=1.0)
    config = gate(metric="loss", better="lower", against="head", max_regression=0.5)
    assert not check_metrics(config, {"loss": 1.4}, reference).is_rejected
    verdict = check_metrics(config, {"loss": 1.6}, reference)
    assert verdict.is_rejected and "(the head)" in verdict.reason
    assert verdict.reason.startswith("loss 1.6000 is 0.6000 worse than 1.0000 of version 2")


def test_a_missing_metric_is_rejected_and_no_reference_passes() -> None:
    verdict = check_metrics(gate(), {"loss": 0.3}, model(2, accuracy=0.5))
    assert verdict.reason == "the round's metrics have no 'accuracy' to check (it has: loss)"
    # nothing to compare with: the initial model has no metrics
    assert check_metrics(gate(), {"accuracy": 0.1}, model(1)) == Verdict(
        check="metric", metric="accuracy", value=0.1
    )
    assert not check_metrics(gate(), {"accuracy": 0.1}, None).is_rejected


# -- reference, best version and the streak --------------------------------------------------


def test_best_version_skips_rejected_ones_and_prefers_the_oldest_on_a_tie() -> None:
    models = [
        model(1),
        model(2, accuracy=0.8),
        model(3, accuracy=0.9),
        model(4, "rejected", accuracy=0.99),
        model(5, accuracy=0.9),  # e.g. a rollback to 3: same metrics
        model(6, accuracy=0.7, loss=0.2),
    ]
    best = best_version(models, "accuracy", "higher")
    assert best is not None and best.version == 3
    lowest = best_version(models, "loss", "lower")
    assert lowest is not None and lowest.version == 6
    assert best_version(models, "f1", "higher") is None
    head = models[-1]
    assert reference_version(gate(against="head"), head=head, models=models) is head
    assert reference_version(gate(), head=head, models=models) is best


def test_the_streak_is_the_rejected_versions_newer_than_the_head() -> None:
    models = [model(1), model(2, "rejected"), model(3), model(4, "rejected"), model(5)]
    models += [model(6, "rejected"), model(7, "rejected")]
    # head 5: rounds that produced 6 and 7 were rejected in a row; 2 and 4 are older history
    assert [m.version for m in rejected_streak(models, models[4])] == [6, 7]
    assert rejected_streak(models, model(8)) == []
