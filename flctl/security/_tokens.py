"""Session tokens: compact JWTs (RFC 7519) signed with HMAC-SHA256, bound to a certificate.

A token is ``base64url(header).base64url(claims).base64url(signature)`` with the header
``{"alg": "HS256", "typ": "JWT"}`` and the claims ``sub`` (the certificate's name), ``sid``
(the session id), ``iat`` and ``exp`` (seconds since the epoch) and
``cnf: {"x5t#S256": ...}``, the SHA-256 thumbprint of the holder's certificate as RFC 8705
writes it. A token presented over a connection authenticated by another certificate is
refused, so a stolen token is useless without the matching key.

Verification refuses any ``alg`` but ``HS256`` before touching the signature, compares
signatures in constant time, and parses the claims only once the signature holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from flctl.core.errors import AuthenticationError

__all__ = ["MAX_TOKEN_LENGTH", "TokenClaims", "TokenSigner"]

MAX_TOKEN_LENGTH = 4096
"""Longest token :meth:`TokenSigner.verify` will look at, in characters."""

_MIN_KEY_BYTES = 32
_HEADER = {"alg": "HS256", "typ": "JWT"}
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")

_MALFORMED = "malformed session token"
_BAD_SIGNATURE = "session token signature is invalid"
_EXPIRED = "session token expired"
_OTHER_CERT = "session token was issued to another certificate"


@dataclass(frozen=True)
class TokenClaims:
    """What a verified session token says.

    Attributes:
        subject: The name of the certificate the token was issued to.
        fingerprint: That certificate's SHA-256 fingerprint (lower-case hex).
        session_id: The session the token belongs to.
        issued_at: When it was issued (seconds since the epoch).
        expires_at: When it expires (seconds since the epoch).
    """

    subject: str
    fingerprint: str
    session_id: str
    issued_at: float
    expires_at: float


class TokenSigner:
    """Issues and verifies session tokens with one secret key.

    Args:
        key: The HMAC key, at least 32 bytes. Keep it secret; it is never shown in ``repr``.

    Raises:
        ValueError: ``key`` is shorter than 32 bytes.
        TypeError: ``key`` is not bytes.

    Example:
        >>> signer = TokenSigner.generate()
        >>> token = signer.issue("c1", "ab" * 32, "s-1", ttl_s=600)
        >>> signer.verify(token, fingerprint="ab" * 32).subject
        'c1'
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"key must be at least {_MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "TokenSigner(key=<hidden>)"

    @classmethod
    def generate(cls) -> TokenSigner:
        """Return a signer with a fresh random 32-byte key."""
        return cls(os.urandom(_MIN_KEY_BYTES))

    def issue(
        self,
        subject: str,
        fingerprint: str,
        session_id: str,
        ttl_s: float,
        *,
        now: float | None = None,
    ) -> str:
        """Issue a token for the holder of one certificate.

        Args:
            subject: The certificate's name.
            fingerprint: The certificate's SHA-256 fingerprint (hex, as :class:`Identity` has).
            session_id: The session the token opens.
            ttl_s: Lifetime in seconds (positive, finite).
            now: Issue time in seconds since the epoch; defaults to ``time.time()``.

        Returns:
            The compact token (ASCII, at most :data:`MAX_TOKEN_LENGTH` characters).

        Raises:
            ValueError: A bad fingerprint, lifetime or time, a non-string subject or session
                id, or claims too long to fit in a token.
        """
        for label, value in (("subject", subject), ("session_id", session_id)):
            if not isinstance(value, str):
                raise ValueError(f"{label} must be a string, got {value!r}")
        if not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive finite number, got {ttl_s!r}")
        issued_at = time.time() if now is None else now
        if not isinstance(issued_at, int | float) or not math.isfinite(issued_at):
            raise ValueError(f"now must be a finite number, got {now!r}")
        claims = {
            "sub": subject,
            "sid": session_id,
            "iat": issued_at,
            "exp": issued_at + ttl_s,
            "cnf": {"x5t#S256": _b64encode(_thumbprint(fingerprint))},
        }
        signing_input = _b64encode(_json(_HEADER)) + "." + _b64encode(_json(claims))
        token = signing_input + "." + _b64encode(self._sign(signing_input))
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(
                f"token would be {len(token)} characters, more than {MAX_TOKEN_LENGTH}; "
                "shorten the subject or session id"
            )
        return token

    def verify(self, token: str, *, fingerprint: str, now: float | None = None) -> TokenClaims:
        """Check a token and that it was issued to the certificate with ``fingerprint``.

        Args:
            token: The compact token as received.
            fingerprint: SHA-256 fingerprint (hex) of the certificate the peer connected with.
            now: The time to check expiry at (seconds since the epoch); defaults to now.

        Returns:
            The token's claims.

        Raises:
            AuthenticationError: The token is malformed or too long, uses another algorithm
                than HS256, has a bad signature, was issued to another certificate, or has
                expired. Nothing else is raised for any ``token`` value.
            ValueError: ``fingerprint`` is not a SHA-256 hex digest (a caller's bug).
        """
        expected_thumbprint = _b64encode(_thumbprint(fingerprint))
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise AuthenticationError(_MALFORMED)
        parts = token.split(".")
        if len(parts) != 3 or not all(_SEGMENT_RE.fullmatch(part) for part in parts):
            raise AuthenticationError(_MALFORMED)
        header_b64, claims_b64, signature_b64 = parts

        header = _decode_object(header_b64)
        if header.get("alg") != "HS256" or header.get("typ", "JWT") != "JWT" or "crit" in header:
            raise AuthenticationError(_MALFORMED)

        # Compare the encoded signatures: constant time, and no second spelling of the same bytes.
        expected = _b64encode(self._sign(header_b64 + "." + claims_b64))
        if not hmac.compare_digest(expected.encode("ascii"), signature_b64.encode("ascii")):
            raise AuthenticationError(_BAD_SIGNATURE)

        claims = _parse_claims(_decode_object(claims_b64))
        if not hmac.compare_digest(
            claims["thumbprint"].encode("ascii"), expected_thumbprint.encode("ascii")
        ):
            raise AuthenticationError(_OTHER_CERT)
        current = time.time() if now is None else now
        if current >= claims["exp"]:
            raise AuthenticationError(_EXPIRED)
        return TokenClaims(
            subject=claims["sub"],
            fingerprint=fingerprint.lower(),
            session_id=claims["sid"],
            issued_at=claims["iat"],
            expires_at=claims["exp"],
        )

    def _sign(self, signing_input: str) -> bytes:
        return hmac.new(self._key, signing_input.encode("ascii"), hashlib.sha256).digest()


def _thumbprint(fingerprint: str) -> bytes:
    if not isinstance(fingerprint, str) or _FINGERPRINT_RE.fullmatch(fingerprint.lower()) is None:
        raise ValueError(f"fingerprint must be 64 hex characters (SHA-256), got {fingerprint!r}")
    return bytes.fromhex(fingerprint)


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name}")


def _decode_object(segment: str) -> dict[str, Any]:
    """Decode one base64url JSON object segment, raising only :class:`AuthenticationError`."""
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (binascii.Error, ValueError, RecursionError):
        # ValueError covers bad UTF-8 and bad JSON; RecursionError deeply nested JSON.
        raise AuthenticationError(_MALFORMED) from None
    if not isinstance(value, dict):
        raise AuthenticationError(_MALFORMED)
    return value


def _parse_claims(claims: dict[str, Any]) -> dict[str, Any]:
    """Check the claims' types; return sub, sid, iat, exp and the certificate thumbprint."""
    cnf = claims.get("cnf")
    thumbprint = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
    numbers = [claims.get("iat"), claims.get("exp")]
    if (
        not isinstance(claims.get("sub"), str)
        or not isinstance(claims.get("sid"), str)
        or not isinstance(thumbprint, str)
        or not thumbprint.isascii()
        or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
    ):
        raise AuthenticationError(_MALFORMED)
    try:
        issued_at, expires_at = float(claims["iat"]), float(claims["exp"])
    except OverflowError:
        raise AuthenticationError(_MALFORMED) from None
    return {
        "sub": claims["sub"],
        "sid": claims["sid"],
        "iat": issued_at,
        "exp": expires_at,
        "thumbprint": thumbprint,
    }
