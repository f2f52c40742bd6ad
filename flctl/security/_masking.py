"""SecAgg masks: a 32-byte seed expanded into a seekable stream of integers modulo ``2**bits``.

The PRG is the ChaCha20 keystream (RFC 8439) from ``cryptography``, keyed by the seed with an
all-zero 96-bit nonce. Why ChaCha20 rather than numpy's Philox or PCG64: SecAgg hides an update
only if its masks cannot be told apart from uniform noise by someone who lacks the seed, which is
what a cryptographic PRG promises and what statistical generators such as Philox or PCG64 do not
(their designers claim good statistics, not security against a distinguisher). ChaCha20 is also
seekable: its 32-bit block counter starts the keystream at any 64-byte block, so the mask of
elements ``[a, b)`` costs ``O(b - a)`` time and memory whatever ``a`` is, and masks can be applied
tensor by tensor, chunk by chunk. Every seed is used for exactly one stream (seeds are fresh per
round), so the fixed nonce never repeats under one key.

An element of a ``bits``-bit stream is the next ``bits / 8`` keystream bytes read as a
little-endian unsigned integer, so it is uniform modulo ``2**bits``. One seed's stream holds at
most ``2**32`` blocks: ``2**36`` elements at 32 bits, ``2**35`` at 64.

A mask term is a ``(seed, sign)`` pair with ``sign`` in ``{1, -1}``; :func:`apply_mask_terms`
adds ``sign * stream(seed)`` to a chunk modulo ``2**bits``. A client masks its quantized update
with its terms, and the server removes what the sum still holds with the opposite terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

__all__ = ["MASK_SEED_BYTES", "MaskTerm", "apply_mask_terms", "mask_dtype", "mask_stream"]

MASK_SEED_BYTES = 32
"""Length of a mask seed: a ChaCha20 key."""

MaskTerm: TypeAlias = tuple[bytes, int]
"""``(seed, sign)``: add ``sign * mask_stream(seed)``, with ``sign`` 1 or -1."""

_BLOCK = 64
_MAX_BLOCKS = 2**32
_ZERO_NONCE = bytes(12)


def mask_dtype(modulus_bits: int) -> np.dtype[Any]:
    """Return the numpy dtype that holds integers modulo ``2**modulus_bits``.

    Args:
        modulus_bits: 32 or 64.

    Returns:
        ``uint32`` or ``uint64`` (little-endian where numpy's native order is).

    Raises:
        ValueError: ``modulus_bits`` is neither 32 nor 64.
    """
    if modulus_bits == 32:
        return np.dtype(np.uint32)
    if modulus_bits == 64:
        return np.dtype(np.uint64)
    raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits!r}")


def mask_stream(seed: bytes, offset: int, count: int, modulus_bits: int) -> NDArray[Any]:
    """Return elements ``[offset, offset + count)`` of the mask stream of ``seed``.

    Args:
        seed: A 32-byte seed.
        offset: The first element's position in the stream (not in bytes).
        count: How many elements.
        modulus_bits: 32 or 64: the elements are uniform modulo ``2**modulus_bits``.

    Returns:
        A fresh ``uint32`` or ``uint64`` array of ``count`` elements.

    Raises:
        ValueError: A bad seed, a negative offset or count, or a range past the stream's end.

    Example:
        >>> whole = mask_stream(b"s" * 32, 0, 100, 32)
        >>> bool((mask_stream(b"s" * 32, 40, 10, 32) == whole[40:50]).all())
        True
    """
    dtype = mask_dtype(modulus_bits)
    if not isinstance(seed, bytes) or len(seed) != MASK_SEED_BYTES:
        raise ValueError(f"a mask seed must be {MASK_SEED_BYTES} bytes")
    if offset < 0 or count < 0:
        raise ValueError(f"offset and count must be >= 0, got {offset!r} and {count!r}")
    size = dtype.itemsize
    start = offset * size
    end = start + count * size
    first_block, skip = divmod(start, _BLOCK)
    if -(-end // _BLOCK) > _MAX_BLOCKS:
        raise ValueError(
            f"elements up to {offset + count} lie past the end of one seed's mask stream "
            f"({_MAX_BLOCKS * _BLOCK // size} elements at {modulus_bits} bits)"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    nonce = first_block.to_bytes(4, "little") + _ZERO_NONCE
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    keystream = encryptor.update(bytes(skip + count * size))
    return np.frombuffer(keystream, dtype=dtype.newbyteorder("<"), offset=skip).astype(dtype)


def apply_mask_terms(
    values: NDArray[Any], offset: int, terms: Sequence[MaskTerm], modulus_bits: int
) -> NDArray[Any]:
    """Return ``values + sum(sign * stream(seed)[offset:offset + len(values)])`` mod ``2**bits``.

    Args:
        values: One chunk of a flat vector, of :func:`mask_dtype`'s dtype for ``modulus_bits``.
        offset: The chunk's first element's position in the whole vector.
        terms: The ``(seed, sign)`` pairs to add.
        modulus_bits: 32 or 64.

    Returns:
        A new array; ``values`` is left unchanged.

    Raises:
        TypeError: ``values`` has another dtype or is not one-dimensional.
        ValueError: A term's sign is not 1 or -1, or as :func:`mask_stream`.
    """
    dtype = mask_dtype(modulus_bits)
    if values.dtype != dtype or values.ndim != 1:
        raise TypeError(
            f"values must be a flat {dtype} array, got {values.dtype} of shape {values.shape}"
        )
    out = values.copy()
    for seed, sign in terms:
        stream = mask_stream(seed, offset, len(values), modulus_bits)
        # Unsigned numpy arithmetic on arrays wraps silently, which is exactly mod 2**bits.
        if sign == 1:
            np.add(out, stream, out=out)
        elif sign == -1:
            np.subtract(out, stream, out=out)
        else:
            raise ValueError(f"a mask term's sign must be 1 or -1, got {sign!r}")
    return out
