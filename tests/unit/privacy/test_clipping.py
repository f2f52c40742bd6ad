"""Clipping bounds every update's L2 norm; the noise has the std the formula says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InvalidInputError, PrivacyError
from flctl.privacy import (
    clip_factor,
    clipped_delta,
    delta_norm,
    gaussian_noise_like,
    l2_norm,
    noise_std,
    secure_generator,
)
from flctl.tensors import save_parameters

# float64 rounding of a sum of squares: relative error far below this for any model size here.
ROUNDING = 1e-12


@st.composite
def updates(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A model and a client's version of it: a few tensors, magnitudes from tiny to huge."""
    shapes = draw(
        st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=4)
    )
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e6]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    base = [torch.randn(tuple(s), generator=gen, dtype=dtype) for s in shapes]
    update = [b + scale * torch.randn(b.shape, generator=gen, dtype=dtype) for b in base]
    return base, update


@settings(max_examples=60, deadline=None)
@given(pair=updates(), clip=st.floats(1e-3, 1e3))
def test_clipped_update_norm_is_at_most_the_clip_norm(
    pair: tuple[list[torch.Tensor], list[torch.Tensor]], clip: float
) -> None:
    base, update = pair
    norm = l2_norm(u.double() - b.double() for u, b in zip(update, base, strict=True))
    factor = clip_factor(norm, clip)
    clipped = [clipped_delta(u, b, factor) for u, b in zip(update, base, strict=True)]
    after = l2_norm(clipped)
    assert after <= clip * (1 + ROUNDING)
    if norm <= clip:  # small updates pass unchanged
        assert factor == 1.0 and after == pytest.approx(norm, rel=ROUNDING, abs=0.0)
    else:  # large ones land on the bound
        assert after == pytest.approx(clip, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(pair=updates())
def test_delta_norm_streams_the_files_to_the_in_memory_norm(
    tmp_path_factory: pytest.TempPathFactory, pair: tuple[list[torch.Tensor], list[torch.Tensor]]
) -> None:
    base, update = pair
    folder = tmp_path_factory.mktemp("norm")
    counter = {"num_batches_tracked": torch.tensor(7)}
    save_parameters({**{f"t{i}": t for i, t in enumerate(base)}, **counter}, folder / "base")
    moved = {"num_batches_tracked": torch.tensor(99)}  # integer tensors do not count
    save_parameters({**{f"t{i}": t for i, t in enumerate(update)}, **moved}, folder / "update")
    expected = l2_norm(u.double() - b.double() for u, b in zip(update, base, strict=True))
    got = delta_norm(folder / "update", folder / "base")
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_delta_norm_refuses_a_mismatched_or_non_finite_update(tmp_path: Path) -> None:
    save_parameters({"w": torch.zeros(3)}, tmp_path / "base")
    save_parameters({"w": torch.zeros(4)}, tmp_path / "wrong")
    save_parameters({"w": torch.tensor([0.0, math.inf, 0.0])}, tmp_path / "inf")
    with pytest.raises(InvalidInputError, match="does not match"):
        delta_norm(tmp_path / "wrong", tmp_path / "base")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        delta_norm(tmp_path / "inf", tmp_path / "base")


def test_clip_factor_edges() -> None:
    assert clip_factor(0.0, 1.0) == 1.0
    assert clip_factor(1.0, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == 0.25
    for norm, clip in [(math.nan, 1.0), (-1.0, 1.0), (math.inf, 1.0), (1.0, 0.0), (1.0, -2.0)]:
        with pytest.raises(PrivacyError):
            clip_factor(norm, clip)
    with pytest.raises(PrivacyError, match="clip factor"):
        clipped_delta(torch.ones(2), torch.zeros(2), 1.5)
    with pytest.raises(PrivacyError, match="floating-point"):
        clipped_delta(torch.ones(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 0.5)


def test_noise_std_is_the_formula() -> None:
    assert noise_std(1.1, 0.5, 10) == pytest.approx(1.1 * 0.5 / 10)
    assert noise_std(0.0, 1.0, 1.0) == 0.0
    for args in [(-1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (math.nan, 1.0, 1.0)]:
        with pytest.raises(PrivacyError):
            noise_std(*args)


# Statistical check with a fixed seed (tests only: real noise is never seeded). With n draws,
# the sample std has a relative standard error of about 1 / sqrt(2n) = 0.16 % at n = 200 000,
# so a 1 % tolerance is over 6 standard errors: a false failure has probability below 1e-9,
# while a wrong formula (a missing denominator, a square root, std vs variance) is off by far
# more than 1 %. The mean is held to 6 standard errors of the mean, std / sqrt(n).
N_DRAWS = 200_000


@pytest.mark.parametrize(
    ("z", "clip", "denominator", "dtype"),
    [
        (1.0, 1.0, 1.0, torch.float64),
        (1.1, 0.5, 10.0, torch.float64),
        (0.7, 2.0, 37.5, torch.float32),
        (5.0, 0.1, 3.0, torch.float64),
    ],
)
def test_noise_std_matches_the_formula_on_many_draws(
    z: float, clip: float, denominator: float, dtype: torch.dtype
) -> None:
    std = noise_std(z, clip, denominator)
    generator = torch.Generator().manual_seed(20240611)
    noise = gaussian_noise_like(torch.zeros(N_DRAWS, dtype=dtype), std, generator)
    assert noise.dtype == dtype and noise.shape == (N_DRAWS,)
    sample = noise.double()
    assert float(sample.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(sample.mean())) <= 6 * std / math.sqrt(N_DRAWS)


def test_noise_is_not_seeded_by_the_project_seed() -> None:
    zeros = torch.zeros(64)
    torch.manual_seed(0)
    first = gaussian_noise_like(zeros, 1.0)
    torch.manual_seed(0)
    second = gaussian_noise_like(zeros, 1.0)
    assert not torch.equal(first, second)
    a, b = secure_generator(), secure_generator()
    assert a.initial_seed() != b.initial_seed()


def test_noise_refuses_bad_input() -> None:
    with pytest.raises(PrivacyError, match="floating-point"):
        gaussian_noise_like(torch.zeros(3, dtype=torch.int64), 1.0)
    with pytest.raises(PrivacyError, match="std"):
        gaussian_noise_like(torch.zeros(3), -1.0)
    assert torch.equal(gaussian_noise_like(torch.zeros(3), 0.0), torch.zeros(3))
