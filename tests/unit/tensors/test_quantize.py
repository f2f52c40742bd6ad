"""SecAgg quantization: the dequantized sum stays within N * c / (2**b - 1) of the clipped sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flctl.core.errors import SecAggError
from flctl.tensors import Quantizer

FLOAT_SLACK = 2.0**-48  # float64 rounding of sums of a few values of size clip_range


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(1, 32),
    clip=st.floats(1e-3, 1e3),
    num_clients=st.integers(1, 12),
    data=st.data(),
)
def test_round_trip_stays_within_the_stated_bound(
    bits: int, clip: float, num_clients: int, data: st.DataObject
) -> None:
    quantizer = Quantizer(clip_range=clip, bits=bits, max_clients=num_clients)
    size = data.draw(st.integers(1, 64), label="size")
    values = st.floats(-2 * clip, 2 * clip, allow_nan=False, allow_infinity=False)
    updates = [
        data.draw(hnp.arrays(np.float64, size, elements=values), label=f"update {i}")
        for i in range(num_clients)
    ]
    total = np.zeros(size, dtype=quantizer.dtype)
    for update in updates:
        q = quantizer.quantize(update)
        assert q.dtype == quantizer.dtype
        assert int(q.max()) <= quantizer.levels
        total += q
    got = quantizer.dequantize_sum(total, num_clients)
    want = np.sum([np.clip(u, -clip, clip) for u in updates], axis=0)
    bound = quantizer.max_sum_error(num_clients)
    assert bound == pytest.approx(num_clients * clip / (2**bits - 1))
    assert np.abs(got - want).max() <= bound + num_clients * clip * FLOAT_SLACK


def test_the_bound_is_tight() -> None:
    # Rounding errors of many values spread over [-delta/2, delta/2]: the largest comes close
    # to the bound, so the formula is not merely a loose upper limit.
    quantizer = Quantizer(clip_range=1.0, bits=12, max_clients=1)
    x = np.random.default_rng(0).uniform(-1, 1, 10_000)
    error = np.abs(quantizer.dequantize_sum(quantizer.quantize(x), 1) - x).max()
    assert 0.95 * quantizer.max_sum_error(1) < error <= quantizer.max_sum_error(1)


def test_the_modulus_follows_the_number_of_clients() -> None:
    # N * (2**b - 1) < 2**32 fits uint32; one client more needs uint64.
    assert Quantizer(1.0, 24, 256).modulus_bits == 32
    assert Quantizer(1.0, 24, 257).modulus_bits == 64
    assert Quantizer(1.0, 24, 257).dtype == np.uint64
    assert Quantizer(1.0, 32, 2**32).modulus_bits == 64
    with pytest.raises(ValueError, match="overflow even modulo 2\\*\\*64"):
        Quantizer(1.0, 32, 2**32 + 2)


def test_a_full_sum_at_the_largest_client_count_does_not_wrap() -> None:
    quantizer = Quantizer(clip_range=1.0, bits=24, max_clients=256)
    top = quantizer.quantize(np.ones(3))
    total = np.zeros(3, dtype=quantizer.dtype)
    for _ in range(256):
        total += top
    assert np.allclose(quantizer.dequantize_sum(total, 256), 256.0)


def test_bad_input_is_refused() -> None:
    quantizer = Quantizer(clip_range=1.0, bits=8, max_clients=3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantizer.quantize([0.0, float("nan")])
    with pytest.raises(ValueError, match="num_clients"):
        quantizer.dequantize_sum(np.zeros(2, np.uint32), 4)
    with pytest.raises(ValueError, match="unsigned"):
        quantizer.dequantize_sum(np.zeros(2, np.int64), 1)
    # a sum that still carries a mask cannot come from 2 quantized updates
    with pytest.raises(SecAggError, match="masks were not all removed"):
        quantizer.dequantize_sum(np.array([3_000_000_000], np.uint32), 2)
    for clip, bits, clients in (
        (0.0, 8, 1),
        (float("inf"), 8, 1),
        (1.0, 0, 1),
        (1.0, 33, 1),
        (1.0, 8, 0),
    ):
        with pytest.raises(ValueError):
            Quantizer(clip_range=clip, bits=bits, max_clients=clients)
