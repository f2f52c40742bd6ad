"""Shamir t-of-n sharing: any t shares recover, fewer do not, corrupt shares are caught."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import SecAggThresholdError, ShareRefusedError
from flctl.security import SHAMIR_PRIME, ShamirShare, recover_secret, split_secret


@st.composite
def sharings(draw: st.DrawFn) -> tuple[bytes, int, list[ShamirShare]]:
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, n))
    secret = draw(st.binary(min_size=1, max_size=70))
    indices = draw(st.lists(st.integers(1, 2**16 - 1), min_size=n, max_size=n, unique=True))
    return secret, t, split_secret(secret, t, indices)


@settings(max_examples=60, deadline=None)
@given(sharing=sharings(), data=st.data())
def test_any_threshold_shares_recover_the_secret(
    sharing: tuple[bytes, int, list[ShamirShare]], data: st.DataObject
) -> None:
    secret, t, shares = sharing
    size = data.draw(st.integers(t, len(shares)), label="subset size")
    subset = data.draw(st.permutations(shares), label="order")[:size]
    assert recover_secret(subset) == secret


@settings(max_examples=60, deadline=None)
@given(sharing=sharings(), data=st.data())
def test_fewer_than_threshold_shares_do_not_give_the_secret(
    sharing: tuple[bytes, int, list[ShamirShare]], data: st.DataObject
) -> None:
    secret, t, shares = sharing
    subset = data.draw(st.permutations(shares), label="order")[: t - 1]
    if subset:
        with pytest.raises(SecAggThresholdError, match=f"needs {t}"):
            recover_secret(subset)
    if t >= 2:
        # Interpolating the t - 1 shares as if they were enough does not land on the secret
        # (t - 1 points fit a polynomial through any value at zero).
        lowered = [dataclasses.replace(s, threshold=t - 1) for s in subset]
        try:
            guess = recover_secret(lowered)
        except ShareRefusedError:
            return  # the interpolated value is not even a secret of this length
        assert guess != secret


def test_one_share_is_independent_of_the_secret() -> None:
    # With the same coefficients, two different secrets' shares at x = 1 differ exactly by the
    # secrets' difference, and the coefficient is uniform: a share alone says nothing.
    def fixed(n: int) -> bytes:
        return b"\x07" * n

    a = split_secret(b"\x00" * 15, 2, [1, 2], random_bytes=fixed)
    b = split_secret(b"\x01" * 15, 2, [1, 2], random_bytes=fixed)
    diff = (b[0].values[0] - a[0].values[0]) % SHAMIR_PRIME
    assert diff == int.from_bytes(b"\x01" * 15, "big")


def test_a_corrupt_share_among_more_than_threshold_is_caught() -> None:
    shares = split_secret(b"s" * 32, 3, [1, 2, 3, 4, 5])
    bad = dataclasses.replace(
        shares[4], values=((shares[4].values[0] + 1) % SHAMIR_PRIME, *shares[4].values[1:])
    )
    with pytest.raises(ShareRefusedError, match="does not lie on the polynomial"):
        recover_secret([*shares[:4], bad])
    assert recover_secret(shares[:4]) == b"s" * 32


def test_shares_of_different_secrets_or_repeated_holders_are_refused() -> None:
    a = split_secret(b"a" * 32, 2, [1, 2, 3])
    b = split_secret(b"b" * 16, 2, [1, 2, 3])
    with pytest.raises(ShareRefusedError, match="not all shares of one secret"):
        recover_secret([a[0], b[1]])
    with pytest.raises(ShareRefusedError, match="same holder"):
        recover_secret([a[0], a[0]])
    with pytest.raises(SecAggThresholdError):
        recover_secret([])


def test_wire_form_round_trips_and_malformed_bytes_are_refused() -> None:
    share = split_secret(b"k" * 32, 3, [4, 9, 11])[1]
    data = share.to_bytes()
    assert len(data) == 7 + 3 * 16
    assert ShamirShare.from_bytes(data) == share
    for broken in (data[:5], data[:-1], b"\x02" + data[1:], data[:7] + b"\xff" * 48):
        with pytest.raises(ShareRefusedError, match="malformed share"):
            ShamirShare.from_bytes(broken)


@pytest.mark.parametrize(
    ("secret", "threshold", "indices", "match"),
    [
        (b"", 1, [1], "secret must be"),
        (b"x", 0, [1], "threshold"),
        (b"x", 3, [1, 2], "threshold"),
        (b"x", 1, [1, 1], "distinct"),
        (b"x", 1, [0], "indices must lie"),
    ],
)
def test_bad_arguments_are_refused(
    secret: bytes, threshold: int, indices: list[int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        split_secret(secret, threshold, indices)
