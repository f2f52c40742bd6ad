"""Adaptive clipping: the update rule, the noised count, and the split of the noise."""

from __future__ import annotations

import math
import statistics

import dp_accounting
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import PrivacyError
from flctl.privacy import COUNT_STDDEV_DIVISOR, AdaptiveClipping, default_count_stddev

DELTA = 1e-5


def test_the_clip_norm_moves_geometrically_towards_the_target_quantile() -> None:
    rule = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=1.0)
    # every update unclipped: the clip is too large, it shrinks by exp(-0.2 * 0.5)
    assert rule.next_clip_norm(2.0, 1.0) == pytest.approx(2.0 * math.exp(-0.1), rel=1e-15)
    # every update clipped: it grows
    assert rule.next_clip_norm(2.0, 0.0) == pytest.approx(2.0 * math.exp(0.1), rel=1e-15)
    # on target: it stays
    assert rule.next_clip_norm(2.0, 0.5) == 2.0
    # a noised fraction outside [0, 1] is used as released
    assert rule.next_clip_norm(1.0, -0.3) == pytest.approx(math.exp(0.16), rel=1e-15)


@settings(max_examples=100, deadline=None)
@given(
    clip=st.floats(1e-6, 1e6),
    fraction=st.floats(-1.0, 2.0),
    quantile=st.floats(0.01, 0.99),
    rate=st.floats(0.01, 2.0),
)
def test_the_clip_norm_moves_in_the_direction_of_the_error(
    clip: float, fraction: float, quantile: float, rate: float
) -> None:
    rule = AdaptiveClipping(quantile, rate, 1.0)
    new = rule.next_clip_norm(clip, fraction)
    assert new > 0
    if fraction > quantile:
        assert new < clip
    elif fraction < quantile:
        assert new > clip
    assert math.log(new / clip) == pytest.approx(-rate * (fraction - quantile), abs=1e-9)


@pytest.mark.parametrize(("z", "stddev"), [(1.0, 1.0), (0.8, 5.0), (1.1, 0.6)])
def test_the_split_keeps_the_total_noise_multiplier(z: float, stddev: float) -> None:
    rule = AdaptiveClipping(0.5, 0.2, stddev)
    z_delta = rule.update_noise_multiplier(z)
    assert z_delta > z
    assert (z_delta**-2 + (2 * stddev) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    # the deltas' Gaussian and the count's (sensitivity 1/2, std stddev) on the same sample
    # compose to exactly the Gaussian of noise multiplier z (RDP adds alpha / (2 z^2))
    both = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * stddev)]
    )
    composed, single = dp_accounting.rdp.RdpAccountant(), dp_accounting.rdp.RdpAccountant()
    composed.compose(dp_accounting.SelfComposedDpEvent(both, 10))
    single.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 10))
    assert composed.get_epsilon(DELTA) == pytest.approx(single.get_epsilon(DELTA), rel=1e-9)


def test_a_count_noise_too_small_for_the_budget_is_refused() -> None:
    with pytest.raises(PrivacyError, match="2 \\* clip_count_stddev > noise_multiplier"):
        AdaptiveClipping(0.5, 0.2, 0.5).update_noise_multiplier(1.0)
    with pytest.raises(PrivacyError):
        AdaptiveClipping(0.5, 0.2, 0.5).update_noise_multiplier(0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_quantile": 0.0, "learning_rate": 0.2, "count_stddev": 1.0},
        {"target_quantile": 1.0, "learning_rate": 0.2, "count_stddev": 1.0},
        {"target_quantile": 0.5, "learning_rate": 0.0, "count_stddev": 1.0},
        {"target_quantile": 0.5, "learning_rate": 0.2, "count_stddev": 0.0},
        {"target_quantile": 0.5, "learning_rate": math.inf, "count_stddev": 1.0},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(PrivacyError):
        AdaptiveClipping(**kwargs)


def test_the_released_fraction_is_the_centred_count_plus_noise_over_the_denominator() -> None:
    rule = AdaptiveClipping(0.5, 0.2, count_stddev=2.0)
    seeded = torch.Generator().manual_seed(7)  # a fixed seed, in this test only
    draws = [rule.noisy_fraction(6, 8, 10.0, seeded) for _ in range(20_000)]
    # E = (6 - 8/2) / 10 + 1/2 = 0.7; std = 2 / 10 = 0.2
    assert statistics.fmean(draws) == pytest.approx(0.7, abs=5 * 0.2 / math.sqrt(20_000))
    assert statistics.stdev(draws) == pytest.approx(0.2, rel=0.03)
    # when as many clients answer as expected it estimates the unclipped fraction
    tiny = AdaptiveClipping(0.5, 0.2, count_stddev=1e-12)
    assert tiny.noisy_fraction(3, 10, 10.0) == pytest.approx(0.3, abs=1e-9)
    with pytest.raises(PrivacyError):
        rule.noisy_fraction(9, 8, 10.0)


def test_the_default_count_noise_is_the_expected_clients_over_twenty() -> None:
    assert COUNT_STDDEV_DIVISOR == 20
    assert default_count_stddev(100.0) == 5.0
    with pytest.raises(PrivacyError):
        default_count_stddev(0.0)
