"""Strategy.configure_evaluate / aggregate_evaluate: the defaults every strategy inherits."""

import pytest

from flctl.aggregation import BUILTIN_STRATEGIES, EvaluateResult, FedAvg, strategy_for


def test_default_aggregate_evaluate_is_the_examples_weighted_mean() -> None:
    results = [
        EvaluateResult("c1", 1.0, 10, {"accuracy": 0.5, "f1": 0.2}),
        EvaluateResult("c2", 4.0, 30, {"accuracy": 0.9}),
    ]
    loss, metrics = FedAvg().aggregate_evaluate(results)
    assert loss == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert metrics["accuracy"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    # a metric only some clients report is their weighted mean
    assert metrics["f1"] == pytest.approx(0.2)
    assert list(metrics) == ["accuracy", "f1"]


def test_default_aggregate_evaluate_of_one_result_is_that_result() -> None:
    loss, metrics = FedAvg().aggregate_evaluate([EvaluateResult("c1", 0.25, 7, {"acc": 1.0})])
    assert (loss, metrics) == (0.25, {"acc": 1.0})


def test_default_aggregate_evaluate_refuses_no_results() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        FedAvg().aggregate_evaluate([])


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_every_builtin_has_the_evaluate_defaults(name: str) -> None:
    strategy = strategy_for(name)
    assert strategy.configure_evaluate(1, ["c1", "c2"]) == {}
    loss, metrics = strategy.aggregate_evaluate(
        [EvaluateResult("c1", 2.0, 1, {}), EvaluateResult("c2", 4.0, 3, {})]
    )
    assert loss == pytest.approx(3.5)
    assert metrics == {}
