"""cap_weights: one client's claimed num_examples cannot buy a round's aggregate."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.aggregation import cap_weights

NO_BOUND = 1 << 40


def test_the_defaults_change_nothing() -> None:
    claims = [64, 3, 1_000_000, 2**30]
    assert cap_weights(claims, max_examples=1_000_000_000, max_share=1.0) == [
        64,
        3,
        1_000_000,
        1_000_000_000,
    ]
    assert cap_weights([7, 9], max_examples=NO_BOUND, max_share=1.0) == [7, 9]


def test_a_hostile_claim_is_held_to_its_share() -> None:
    # two honest clients of 64 examples and one claiming 2^40
    weights = cap_weights([64, 64, 2**40], max_examples=10**9, max_share=0.5)
    assert weights == [64, 64, 128]
    weights = cap_weights([64, 64, 2**40], max_examples=10**9, max_share=0.34)
    assert weights[:2] == [64, 64] and weights[2] / sum(weights) <= 0.34


def test_a_claim_above_the_bound_counts_as_the_bound() -> None:
    assert cap_weights([10, 20, 30], max_examples=25, max_share=1.0) == [10, 20, 25]


def test_one_update_is_never_capped() -> None:
    assert cap_weights([2**40], max_examples=NO_BOUND, max_share=0.1) == [2**40]


def test_an_unreachable_share_weighs_every_update_the_same() -> None:
    # three updates cannot each hold at most 0.3 of the total
    assert cap_weights([10, 20, 30], max_examples=NO_BOUND, max_share=0.3) == [10, 10, 10]


def test_several_heavy_updates_are_lowered_together() -> None:
    assert cap_weights([5, 100, 100], max_examples=NO_BOUND, max_share=0.4) == [5, 10, 10]


@pytest.mark.parametrize(
    ("claims", "max_examples", "max_share", "message"),
    [
        ([0, 5], 10, 1.0, "every claim must be positive"),
        ([5], 0, 1.0, "max_examples must be at least 1"),
        ([5], 10, 0.0, "max_share must be in (0, 1]"),
        ([5], 10, 1.5, "max_share must be in (0, 1]"),
    ],
)
def test_bad_arguments_are_refused(
    claims: list[int], max_examples: int, max_share: float, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        cap_weights(claims, max_examples=max_examples, max_share=max_share)
    assert message in str(info.value)


@settings(max_examples=300, deadline=None)
@given(
    claims=st.lists(st.integers(1, 1 << 40), min_size=2, max_size=12),
    max_examples=st.integers(1, 1 << 40),
    max_share=st.floats(0.01, 1.0),
)
def test_caps_hold_and_only_lower_weights(
    claims: list[int], max_examples: int, max_share: float
) -> None:
    weights = cap_weights(claims, max_examples=max_examples, max_share=max_share)
    bounded = [min(c, max_examples) for c in claims]
    assert all(1 <= w <= b for w, b in zip(weights, bounded, strict=True))
    total = sum(weights)
    share = Fraction(max_share)
    if share * len(claims) > 1:
        # every share within the cap (the 1-example floor aside)
        assert all(w == 1 or Fraction(w, total) <= share for w in weights)
        # the updates that were not lowered keep their claims exactly
        lowered = [i for i, (w, b) in enumerate(zip(weights, bounded, strict=True)) if w < b]
        if lowered:
            kept = [b for w, b in zip(weights, bounded, strict=True) if w == b]
            assert all(weights[i] >= max(kept, default=0) for i in lowered)
    else:
        assert len(set(weights)) == 1
    # the order of the claims does not change any update's weight
    reverse = cap_weights(claims[::-1], max_examples=max_examples, max_share=max_share)
    assert reverse[::-1] == weights
