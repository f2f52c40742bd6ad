"""flctl.privacy's accountant against dp-accounting's own RdpAccountant and PLDAccountant.

The reference numbers are computed here straight from dp-accounting (``compose(event, T)``
on a fresh accountant), never through flctl. Run with ``-s`` to see the largest relative
difference on the grid:

    .venv/bin/python -m pytest tests/unit/privacy/test_accountant.py -q -s
"""

from __future__ import annotations

import itertools
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from flctl.core.errors import PrivacyError
from flctl.privacy import (
    PLAN_TOLERANCE,
    PLD_DISCRETIZATION,
    Accountant,
    SampledGaussianRound,
    epsilon,
    plan_noise,
    rounds_left,
)

DELTA = 1e-5
RTOL = 0.01  # the bar: agree with dp-accounting within 1 % relative

# RDP: every combination. PLD is far slower (seconds per case at small z), so few, small cases.
RDP_GRID = list(itertools.product([0.5, 1.0, 5.0], [0.01, 0.1, 0.5, 1.0], [1, 10, 100]))
PLD_GRID = [(1.0, 0.1, 10), (2.0, 0.01, 100), (5.0, 1.0, 100)]


def reference(z: float, q: float, rounds: int, kind: str) -> float:
    """Epsilon of T Poisson-sampled Gaussian rounds, from dp-accounting alone."""
    if kind == "rdp":
        acc = RdpAccountant()
    else:
        acc = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(event, rounds)
    return float(acc.get_epsilon(DELTA))


def reference_fixed(z: float, population: int, sample_size: int, rounds: int) -> float:
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_accounting.GaussianDpEvent(z)
    )
    acc.compose(event, rounds)
    return float(acc.get_epsilon(DELTA))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_epsilon_agrees_with_dp_accounting_on_the_grid() -> None:
    worst = (0.0, "")
    for kind, grid in (("rdp", RDP_GRID), ("pld", PLD_GRID)):
        for z, q, rounds in grid:
            ours = epsilon(z, rounds, DELTA, accountant=kind, sampling_rate=q)  # type: ignore[arg-type]
            theirs = reference(z, q, rounds, kind)
            diff = rel(ours, theirs)
            assert diff <= RTOL, (kind, z, q, rounds, ours, theirs)
            worst = max(worst, (diff, f"{kind} z={z} q={q} T={rounds}"))
    print(
        f"\nlargest relative difference vs dp-accounting, epsilon over {len(RDP_GRID)} RDP and "
        f"{len(PLD_GRID)} PLD cases (delta={DELTA}): {worst[0]:.3g} ({worst[1]})"
    )


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_pld_at_full_participation_matches_the_exact_gaussian(z: float, rounds: int) -> None:
    # With q = 1, T Gaussian rounds of std z are one Gaussian of std z / sqrt(T), whose exact
    # epsilon (Balle and Wang 2018) dp-accounting gives in closed form: an independent check.
    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(rounds), DELTA)
    ours = epsilon(z, rounds, DELTA, accountant="pld", sampling_rate=1.0)
    assert ours >= exact * (1 - 1e-6)  # PLD discretisation is pessimistic
    assert rel(ours, exact) <= RTOL


def test_fixed_size_sampling_is_rdp_with_replace_one() -> None:
    ours = epsilon(1.1, 50, DELTA, sampling="fixed", population=1000, sample_size=50)
    assert rel(ours, reference_fixed(1.1, 1000, 50, 50)) <= 1e-12
    # the same rate under add/remove-one (poisson) is a different, smaller number
    assert epsilon(1.1, 50, DELTA, sampling_rate=0.05) < ours
    with pytest.raises(PrivacyError, match="PLD accountant cannot account for fixed"):
        epsilon(1.1, 50, DELTA, accountant="pld", sampling="fixed", population=10, sample_size=5)


def test_zero_rounds_cost_nothing() -> None:
    assert epsilon(1.0, 0, DELTA, sampling_rate=0.1) == 0.0
    assert Accountant(DELTA).epsilons() == {"rdp": 0.0, "pld": 0.0}


# (target epsilon, q, T, accountant, tolerance): PLD with a coarser tolerance to stay fast.
PLAN_GRID = [
    (8.0, 0.1, 100, "rdp", PLAN_TOLERANCE),
    (2.0, 0.01, 100, "rdp", PLAN_TOLERANCE),
    (1.0, 1.0, 10, "rdp", PLAN_TOLERANCE),
    (1.0, 0.5, 10, "pld", 1e-2),
]


@pytest.mark.parametrize(("target", "q", "rounds", "kind", "tol"), PLAN_GRID)
def test_plan_is_the_smallest_noise_meeting_the_target(
    target: float, q: float, rounds: int, kind: str, tol: float
) -> None:
    z = plan_noise(target, DELTA, rounds, q, kind, tolerance=tol)  # type: ignore[arg-type]
    achieved = reference(z, q, rounds, kind)
    assert achieved <= target
    assert reference(z * (1 - tol), q, rounds, kind) > target
    print(
        f"\nplan {kind} eps={target} q={q} T={rounds}: z={z:.5g}, dp-accounting eps={achieved:.5g}"
    )


def test_plan_agrees_with_dp_accounting_calibration() -> None:
    target, q, rounds = 3.0, 0.1, 50
    ours = plan_noise(target, DELTA, rounds, q)

    def event(z: float) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(z)
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, gaussian), rounds
        )

    theirs = dp_accounting.calibrate_dp_mechanism(
        RdpAccountant,
        event,
        target,
        DELTA,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1.0, 2.0),
        tol=1e-4,
    )
    diff = rel(ours, theirs)
    print(
        f"\nplan vs dp_accounting.calibrate_dp_mechanism: z={ours:.6g} vs {theirs:.6g}, {diff:.2g}"
    )
    assert diff <= PLAN_TOLERANCE * 1.01


def test_plan_refuses_targets_outside_its_range() -> None:
    with pytest.raises(PrivacyError, match="met even with noise multiplier"):
        plan_noise(500.0, DELTA, 1, 0.1)
    with pytest.raises(PrivacyError, match="needs a noise multiplier above"):
        plan_noise(1e-6, DELTA, 100, 1.0)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: epsilon(0.0, 10, DELTA, sampling_rate=0.1), "noise_multiplier must be"),
        (lambda: epsilon(math.nan, 10, DELTA, sampling_rate=0.1), "noise_multiplier must be"),
        (lambda: epsilon(1.0, 10, DELTA), "poisson sampling needs a sampling_rate"),
        (lambda: epsilon(1.0, 10, DELTA, sampling_rate=1.5), "sampling_rate must be in"),
        (lambda: epsilon(1.0, -1, DELTA, sampling_rate=0.1), "rounds must be an integer >= 0"),
        (lambda: epsilon(1.0, 10, 0.0, sampling_rate=0.1), "delta must be strictly between"),
        (lambda: epsilon(1.0, 10, DELTA, accountant="moments", sampling_rate=0.1), "accountant"),
        (lambda: epsilon(1.0, 1, DELTA, sampling="fixed", population=5), "needs a population"),
        (
            lambda: epsilon(1.0, 1, DELTA, sampling="fixed", population=5, sample_size=6),
            "population must be an integer >= sample_size",
        ),
        (
            lambda: epsilon(1.0, 1, DELTA, sampling_rate=0.1, sample_size=6),
            "poisson sampling takes only a sampling_rate",
        ),
        (
            lambda: SampledGaussianRound(
                1.0, "fixed", sampling_rate=0.5, population=10, sample_size=2
            ),
            "contradicts sample_size / population",
        ),
        (lambda: plan_noise(0.0, DELTA, 10, 0.1), "target epsilon must be"),
        (lambda: plan_noise(1.0, DELTA, 0, 0.1), "rounds must be at least 1"),
        (lambda: Accountant(delta=1.0), "delta must be strictly between"),
    ],
)
def test_bad_arguments_are_privacy_errors(call: object, needle: str) -> None:
    with pytest.raises(PrivacyError, match=needle):
        call()  # type: ignore[operator]


def test_ledger_of_identical_rounds_equals_epsilon() -> None:
    step = SampledGaussianRound(2.0, sampling_rate=0.1)
    acc = Accountant(DELTA)
    for _ in range(20):
        acc.charge(step)
    assert acc.rounds == 20 and acc.adjacency == "add_or_remove_one"
    got = acc.epsilons()
    assert got["rdp"] == epsilon(2.0, 20, DELTA, sampling_rate=0.1)
    assert got["pld"] == epsilon(2.0, 20, DELTA, accountant="pld", sampling_rate=0.1)
    assert rel(got["rdp"], reference(2.0, 0.1, 20, "rdp")) <= 1e-12
    assert got["pld"] is not None and rel(got["pld"], reference(2.0, 0.1, 20, "pld")) <= RTOL


def test_ledger_with_changing_rounds_composes_them_all() -> None:
    rounds = [
        SampledGaussianRound(3.0, sampling_rate=0.1),
        SampledGaussianRound(3.0, sampling_rate=0.1),
        SampledGaussianRound(4.0, sampling_rate=0.2),
        SampledGaussianRound(3.0, sampling_rate=0.05),
    ]
    acc = Accountant(DELTA, rounds)
    for kind, fresh in (
        ("rdp", RdpAccountant),
        ("pld", lambda: PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)),
    ):
        ref = fresh()
        for r in rounds:
            ref.compose(r.dp_event())
        assert rel(acc.epsilon(kind), ref.get_epsilon(DELTA)) <= RTOL  # type: ignore[arg-type]


def test_epsilon_after_charges_nothing_and_predicts_the_charge() -> None:
    step = SampledGaussianRound(1.2, sampling_rate=0.2)
    acc = Accountant(DELTA, [step] * 3)
    before = acc.epsilon()
    predicted = acc.epsilon_after(step)
    assert acc.rounds == 3 and acc.epsilon() == before < predicted
    acc.charge(step)
    assert acc.epsilon() == pytest.approx(predicted, rel=1e-12)


def test_fixed_ledger_reports_rdp_only_and_refuses_mixing() -> None:
    fixed = SampledGaussianRound(1.0, "fixed", population=100, sample_size=10)
    acc = Accountant(DELTA, [fixed, fixed])
    assert acc.adjacency == "replace_one" and acc.accountants == ("rdp",)
    eps = acc.epsilons()
    assert eps["pld"] is None
    assert eps["rdp"] == pytest.approx(reference_fixed(1.0, 100, 10, 2), rel=1e-12)
    with pytest.raises(PrivacyError, match="different adjacency"):
        acc.charge(SampledGaussianRound(1.0, sampling_rate=0.1))
    with pytest.raises(PrivacyError, match="cannot account for fixed"):
        acc.epsilon("pld")


# PLD at q = 1 (a plain Gaussian) keeps the PLD search fast.
@pytest.mark.parametrize(
    ("kind", "z", "q", "budget", "done"), [("rdp", 3.0, 0.1, 1.0, 2), ("pld", 5.0, 1.0, 2.0, 1)]
)
def test_rounds_left_is_the_last_count_within_budget(
    kind: str, z: float, q: float, budget: float, done: int
) -> None:
    left = rounds_left(budget, DELTA, z, accountant=kind, sampling_rate=q, rounds_done=done)  # type: ignore[arg-type]
    assert left > 0
    assert reference(z, q, done + left, kind) <= budget < reference(z, q, done + left + 1, kind)
    if kind == "rdp":  # the ledger's search is the same code; once is enough for slow PLD
        step = SampledGaussianRound(z, sampling_rate=q)
        assert Accountant(DELTA, [step] * done).rounds_left(step, budget) == left


def test_rounds_left_edges() -> None:
    assert rounds_left(0.01, DELTA, 0.5, sampling_rate=1.0) == 0
    assert rounds_left(1e4, DELTA, 50.0, sampling_rate=0.01, max_rounds=1000) == 1000
    spent = Accountant(DELTA, [SampledGaussianRound(0.5, sampling_rate=1.0)] * 5)
    assert spent.rounds_left(SampledGaussianRound(0.5, sampling_rate=1.0), 1.0) == 0


def test_rounds_left_with_an_empty_ledger_and_inf_in_the_rdp_curve() -> None:
    # at q = 0.5, z = 1 some RDP orders are inf: an empty ledger must not make them NaN
    step = SampledGaussianRound(1.0, sampling_rate=0.5)
    left = Accountant(DELTA).rounds_left(step, 10.0)
    assert reference(1.0, 0.5, left, "rdp") <= 10.0 < reference(1.0, 0.5, left + 1, "rdp")
    assert left == rounds_left(10.0, DELTA, 1.0, sampling_rate=0.5)
