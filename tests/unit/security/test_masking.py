"""SecAgg masks: seekable ChaCha20 streams, pairwise cancellation, masked vectors look random."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.security import (
    X25519KeyPair,
    apply_mask_terms,
    derive_mask_seed,
    mask_dtype,
    mask_stream,
)
from flctl.tensors import Quantizer

SEED = hashlib.sha256(b"mask seed").digest()


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    total=st.integers(1, 3000),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
)
def test_chunked_masks_equal_the_one_shot_mask(bits: int, total: int, cuts: list[int]) -> None:
    whole = mask_stream(SEED, 0, total, bits)
    bounds = sorted({0, total, *(c % total for c in cuts)})
    pieces = [mask_stream(SEED, a, b - a, bits) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert np.array_equal(np.concatenate(pieces), whole)
    assert whole.dtype == mask_dtype(bits)


def test_a_far_offset_costs_only_its_chunk() -> None:
    # The mask of [2**33, 2**33 + 4) comes without generating what lies before it.
    far = mask_stream(SEED, 2**33, 4, 32)
    assert far.shape == (4,)
    assert np.array_equal(mask_stream(SEED, 2**33 + 2, 2, 32), far[2:])
    with pytest.raises(ValueError, match="past the end"):
        mask_stream(SEED, 2**36 - 1, 2, 32)


def test_pairwise_masks_cancel_in_the_sum() -> None:
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    round_seed = bytes(32)
    seed_ab = derive_mask_seed(a.exchange(b.public_key), round_seed)
    assert seed_ab == derive_mask_seed(b.exchange(a.public_key), round_seed)
    rng = np.random.default_rng(0)
    for bits in (32, 64):
        x = rng.integers(0, 2**24, 1000).astype(mask_dtype(bits))
        y = rng.integers(0, 2**24, 1000).astype(mask_dtype(bits))
        masked_x = apply_mask_terms(x, 0, [(seed_ab, 1)], bits)
        masked_y = apply_mask_terms(y, 0, [(seed_ab, -1)], bits)
        assert not np.array_equal(masked_x, x)
        assert np.array_equal(masked_x + masked_y, x + y)
        # chunk by chunk, at the chunk's offset, gives the same masked vector
        chunks = [
            apply_mask_terms(x[o : o + 300], o, [(seed_ab, 1)], bits) for o in (0, 300, 600, 900)
        ]
        assert np.array_equal(np.concatenate(chunks), masked_x)


def test_the_masked_vector_alone_is_uncorrelated_with_the_plaintext() -> None:
    # A 100k-element update with structure (a ramp plus noise), quantized and masked with a
    # self mask as a client does: the masked values' correlation with it is below 0.01.
    n = 100_000
    rng = np.random.default_rng(1)
    update = np.linspace(-0.9, 0.9, n) + rng.normal(0, 0.05, n)
    quantizer = Quantizer(clip_range=1.0, bits=24, max_clients=10)
    q = quantizer.quantize(update)
    assert np.corrcoef(q.astype(np.float64), update)[0, 1] > 0.99
    masked = apply_mask_terms(q, 0, [(SEED, 1)], quantizer.modulus_bits)
    r = np.corrcoef(masked.astype(np.float64), update)[0, 1]
    assert abs(r) < 0.01, r
    # and the masked values spread over the whole modulus, not the quantization range
    assert masked.max() > 2**31 and masked.min() < 2**30


def test_bad_arguments_are_refused() -> None:
    x = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError, match="32 or 64"):
        mask_stream(SEED, 0, 4, 16)
    with pytest.raises(ValueError, match="32 bytes"):
        mask_stream(b"short", 0, 4, 32)
    with pytest.raises(ValueError, match=">= 0"):
        mask_stream(SEED, -1, 4, 32)
    with pytest.raises(ValueError, match="sign"):
        apply_mask_terms(x, 0, [(SEED, 2)], 32)
    with pytest.raises(TypeError, match="uint32"):
        apply_mask_terms(x.astype(np.uint64), 0, [(SEED, 1)], 32)
    assert mask_stream(SEED, 5, 0, 64).shape == (0,)
