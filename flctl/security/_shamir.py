"""Shamir's t-of-n secret sharing over the prime field of the Mersenne prime ``2**127 - 1``.

A secret of any length (SecAgg shares 32-byte keys and seeds) is cut into 15-byte pieces, each
one an element of the field (``2**120 < 2**127 - 1``), and every piece is shared with its own
random polynomial of degree ``t - 1``; a share holds one value per piece, all at the holder's
x-coordinate. Any ``t`` shares give the secret back by Lagrange interpolation at zero; ``t - 1``
shares are equally consistent with every secret, so they tell nothing about it.

Coefficients come from :func:`secrets.randbelow` (the operating system's CSPRNG) unless the
caller passes its own ``random_bytes`` (tests make runs reproducible that way).

Wire form of a share (:meth:`ShamirShare.to_bytes`): version ``1`` (1 byte), then the x-coordinate,
the threshold and the secret's length (2 bytes each, big-endian), then each value in 16 bytes,
big-endian.
"""

from __future__ import annotations

import functools
import math
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flctl.core.errors import SecAggThresholdError, ShareRefusedError

__all__ = ["SHAMIR_PRIME", "ShamirShare", "recover_secret", "split_secret"]

SHAMIR_PRIME = 2**127 - 1
"""The field's modulus: a Mersenne prime, so shares are 16 bytes per piece of the secret."""

_PIECE_BYTES = 15
_VALUE_BYTES = 16
_VERSION = 1
_HEADER = struct.Struct(">BHHH")
_MAX_INDEX = 2**16 - 1


@dataclass(frozen=True)
class ShamirShare:
    """One holder's share of a secret.

    Attributes:
        index: The holder's x-coordinate, ``1 <= index <= 65535``; distinct per holder.
        threshold: How many shares recover the secret.
        secret_length: The secret's length in bytes.
        values: The polynomials' values at ``index``, one per 15-byte piece of the secret.
    """

    index: int
    threshold: int
    secret_length: int
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.index <= _MAX_INDEX:
            raise ValueError(f"share index must be in 1..{_MAX_INDEX}, got {self.index!r}")
        if not 1 <= self.threshold <= _MAX_INDEX:
            raise ValueError(f"threshold must be in 1..{_MAX_INDEX}, got {self.threshold!r}")
        if not 1 <= self.secret_length <= _MAX_INDEX:
            raise ValueError(
                f"secret_length must be in 1..{_MAX_INDEX}, got {self.secret_length!r}"
            )
        if len(self.values) != _num_pieces(self.secret_length):
            raise ValueError(
                f"a {self.secret_length}-byte secret has {_num_pieces(self.secret_length)} "
                f"values per share, got {len(self.values)!r}"
            )
        if any(not 0 <= v < SHAMIR_PRIME for v in self.values):
            raise ValueError("share values must lie in the field [0, 2**127 - 1)")

    def to_bytes(self) -> bytes:
        """Return the share's wire form (see the module docstring)."""
        head = _HEADER.pack(_VERSION, self.index, self.threshold, self.secret_length)
        return head + b"".join(v.to_bytes(_VALUE_BYTES, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShamirShare:
        """Parse a share's wire form.

        Args:
            data: What :meth:`to_bytes` wrote.

        Returns:
            The share.

        Raises:
            ShareRefusedError: The bytes are not a well-formed share.
        """
        if len(data) < _HEADER.size:
            raise ShareRefusedError(f"malformed share: {len(data)} bytes is too short")
        version, index, threshold, secret_length = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise ShareRefusedError(f"malformed share: unknown version {version}")
        body = data[_HEADER.size :]
        if secret_length < 1 or len(body) != _num_pieces(secret_length) * _VALUE_BYTES:
            raise ShareRefusedError(
                f"malformed share: {len(body)} bytes of values for a {secret_length}-byte secret"
            )
        values = tuple(
            int.from_bytes(body[i : i + _VALUE_BYTES], "big")
            for i in range(0, len(body), _VALUE_BYTES)
        )
        try:
            return cls(index, threshold, secret_length, values)
        except ValueError as exc:
            raise ShareRefusedError(f"malformed share: {exc}") from exc


def split_secret(
    secret: bytes,
    threshold: int,
    indices: Sequence[int],
    *,
    random_bytes: Callable[[int], bytes] | None = None,
) -> list[ShamirShare]:
    """Split ``secret`` so that any ``threshold`` of the returned shares recover it.

    Args:
        secret: The secret, 1 to 65535 bytes.
        threshold: How many shares recover it, ``1 <= threshold <= len(indices)``.
        indices: The holders' x-coordinates: distinct, in ``1..65535``. One share each, in order.
        random_bytes: Where the polynomials' coefficients come from; the operating system's
            CSPRNG when omitted. Only tests pass one.

    Returns:
        One share per index.

    Raises:
        ValueError: An argument is out of range, or indices repeat.

    Example:
        >>> shares = split_secret(b"k" * 32, 2, [1, 2, 3])
        >>> recover_secret(shares[1:]) == b"k" * 32
        True
    """
    if not 1 <= len(secret) <= _MAX_INDEX:
        raise ValueError(f"secret must be 1 to {_MAX_INDEX} bytes, got {len(secret)!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"share indices must be distinct, got {list(indices)!r}")
    if any(not 1 <= i <= _MAX_INDEX for i in indices):
        raise ValueError(f"share indices must lie in 1..{_MAX_INDEX}, got {list(indices)!r}")
    if not 1 <= threshold <= len(indices):
        raise ValueError(f"threshold must be in 1..{len(indices)}, got {threshold!r}")
    draw = _field_draw(random_bytes)
    pieces = [
        int.from_bytes(secret[i : i + _PIECE_BYTES], "big")
        for i in range(0, len(secret), _PIECE_BYTES)
    ]
    polys = [[piece] + [draw() for _ in range(threshold - 1)] for piece in pieces]
    return [
        ShamirShare(
            index=x,
            threshold=threshold,
            secret_length=len(secret),
            values=tuple(_evaluate(poly, x) for poly in polys),
        )
        for x in indices
    ]


def recover_secret(shares: Sequence[ShamirShare]) -> bytes:
    """Recover a secret from at least its threshold of shares.

    The first ``threshold`` shares (by index) fix the polynomials; every further share must lie
    on them, so a corrupt share among more than ``threshold`` is caught rather than turned into a
    wrong secret (with exactly ``threshold`` shares nothing can tell a corrupt one apart).

    Args:
        shares: Shares of one secret, from distinct holders.

    Returns:
        The secret.

    Raises:
        SecAggThresholdError: Fewer shares than the threshold.
        ShareRefusedError: The shares are of different secrets, repeat a holder, or disagree.
    """
    if not shares:
        raise SecAggThresholdError("no shares to recover a secret from")
    first = shares[0]
    for share in shares:
        if (share.threshold, share.secret_length) != (first.threshold, first.secret_length):
            raise ShareRefusedError(
                "shares disagree on the threshold or the secret's length: they are not all "
                "shares of one secret"
            )
    ordered = sorted(shares, key=lambda s: s.index)
    indices = [s.index for s in ordered]
    if len(set(indices)) != len(indices):
        raise ShareRefusedError(f"two shares claim the same holder index: {indices!r}")
    if len(ordered) < first.threshold:
        raise SecAggThresholdError(
            f"{len(ordered)} shares cannot recover a secret that needs {first.threshold}"
        )
    basis, extra = ordered[: first.threshold], ordered[first.threshold :]
    xs = tuple(s.index for s in basis)
    for check in extra:
        weights = _lagrange_weights(xs, check.index)
        for piece, value in enumerate(check.values):
            if _combine(weights, [s.values[piece] for s in basis]) != value:
                raise ShareRefusedError(
                    f"the share of holder {check.index} does not lie on the polynomial of the "
                    "others: at least one share is corrupt"
                )
    weights = _lagrange_weights(xs, 0)
    out = bytearray()
    remaining = first.secret_length
    for piece in range(len(first.values)):
        value = _combine(weights, [s.values[piece] for s in basis])
        size = min(_PIECE_BYTES, remaining)
        if value >= 1 << (8 * size):
            raise ShareRefusedError("the shares do not give back a secret of the stated length")
        out += value.to_bytes(size, "big")
        remaining -= size
    return bytes(out)


def _num_pieces(secret_length: int) -> int:
    return math.ceil(secret_length / _PIECE_BYTES)


def _field_draw(random_bytes: Callable[[int], bytes] | None) -> Callable[[], int]:
    """Return a function drawing a uniform field element."""
    if random_bytes is None:
        return lambda: secrets.randbelow(SHAMIR_PRIME)
    source = random_bytes

    def draw() -> int:
        # Rejection sampling keeps the draw uniform: 16 bytes masked to 127 bits, retried on p.
        while True:
            value = int.from_bytes(source(_VALUE_BYTES), "big") & SHAMIR_PRIME
            if value < SHAMIR_PRIME:
                return value

    return draw


def _evaluate(poly: Sequence[int], x: int) -> int:
    """Evaluate ``poly`` (lowest coefficient first) at ``x`` by Horner's rule."""
    acc = 0
    for coefficient in reversed(poly):
        acc = (acc * x + coefficient) % SHAMIR_PRIME
    return acc


@functools.lru_cache(maxsize=1024)
def _lagrange_weights(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Weights ``w_k`` with ``f(at) = sum_k w_k f(xs[k])`` for any ``f`` of degree < len(xs).

    Cached: in one round every secret is recovered from the same holders, so the O(t^2) work
    is done once per set of holders.
    """
    weights = []
    for k, xk in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != k:
                num = num * (at - xm) % SHAMIR_PRIME
                den = den * (xk - xm) % SHAMIR_PRIME
        weights.append(num * pow(den, -1, SHAMIR_PRIME) % SHAMIR_PRIME)
    return tuple(weights)


def _combine(weights: Sequence[int], values: Sequence[int]) -> int:
    return sum(w * v for w, v in zip(weights, values, strict=True)) % SHAMIR_PRIME
