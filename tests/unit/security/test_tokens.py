from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import AuthenticationError
from flctl.security import MAX_TOKEN_LENGTH, TokenClaims, TokenSigner

KEY = b"k" * 32
FP = "ab" * 32
OTHER_FP = "cd" * 32
NOW = 1_700_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: Any, claims: Any, key: bytes = KEY) -> str:
    """Sign arbitrary header and claims with ``key``, as an attacker who knew it would."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


def _claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "c1",
        "sid": "s1",
        "iat": NOW,
        "exp": NOW + 60,
        "cnf": {"x5t#S256": _b64(bytes.fromhex(FP))},
    }
    base.update(overrides)
    return base


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(KEY)


def test_round_trip(signer: TokenSigner) -> None:
    token = signer.issue("c1", FP, "session-1", ttl_s=60, now=NOW)
    assert token.isascii() and token.count(".") == 2
    claims = signer.verify(token, fingerprint=FP, now=NOW + 59)
    assert claims == TokenClaims(
        subject="c1", fingerprint=FP, session_id="session-1", issued_at=NOW, expires_at=NOW + 60
    )
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert signer.verify(token, fingerprint=FP.upper(), now=NOW).fingerprint == FP


def test_default_clock(signer: TokenSigner) -> None:
    token = signer.issue("c1", FP, "s", ttl_s=600)
    assert signer.verify(token, fingerprint=FP).subject == "c1"


def test_forged_token_matches_our_format(signer: TokenSigner) -> None:
    token = _forge({"alg": "HS256", "typ": "JWT"}, _claims())
    assert signer.verify(token, fingerprint=FP, now=NOW).session_id == "s1"


def test_expired(signer: TokenSigner) -> None:
    token = signer.issue("c1", FP, "s", ttl_s=60, now=NOW)
    for now in (NOW + 60, NOW + 10_000):
        with pytest.raises(AuthenticationError, match="session token expired"):
            signer.verify(token, fingerprint=FP, now=now)


@pytest.mark.parametrize("segment", [0, 1, 2])
def test_flipped_character_breaks_the_signature(signer: TokenSigner, segment: int) -> None:
    token = signer.issue("c1", FP, "s", ttl_s=60, now=NOW)
    parts = token.split(".")
    part = parts[segment]
    # Change a character in the middle (the last one may only carry padding bits).
    i = len(part) // 2
    parts[segment] = part[:i] + ("A" if part[i] != "A" else "B") + part[i + 1 :]
    with pytest.raises(AuthenticationError, match="signature is invalid|malformed"):
        signer.verify(".".join(parts), fingerprint=FP, now=NOW)


def test_last_signature_character_has_one_spelling(signer: TokenSigner) -> None:
    token = signer.issue("c1", FP, "s", ttl_s=60, now=NOW)
    # 32 bytes encode to 43 characters whose last one carries 2 spare bits: every other
    # spelling of the same bytes must be refused too.
    last = token[-1]
    for other in "AEIMQUYcgkosw048":
        if other != last:
            with pytest.raises(AuthenticationError, match="signature is invalid"):
                signer.verify(token[:-1] + other, fingerprint=FP, now=NOW)


def test_another_key_is_refused(signer: TokenSigner) -> None:
    token = TokenSigner.generate().issue("c1", FP, "s", ttl_s=60, now=NOW)
    with pytest.raises(AuthenticationError, match="session token signature is invalid"):
        signer.verify(token, fingerprint=FP, now=NOW)


def test_another_certificate_is_refused(signer: TokenSigner) -> None:
    token = signer.issue("c1", FP, "s", ttl_s=60, now=NOW)
    with pytest.raises(
        AuthenticationError, match="session token was issued to another certificate"
    ):
        signer.verify(token, fingerprint=OTHER_FP, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none", "typ": "JWT"},
        {"alg": "HS512", "typ": "JWT"},
        {"alg": "RS256"},
        {"typ": "JWT"},
        {"alg": "HS256", "typ": "JWE"},
        {"alg": "HS256", "crit": ["exp"]},
        ["alg", "HS256"],
    ],
)
def test_other_algorithms_and_headers_are_refused(signer: TokenSigner, header: Any) -> None:
    with pytest.raises(AuthenticationError, match="malformed session token"):
        signer.verify(_forge(header, _claims()), fingerprint=FP, now=NOW)


def test_alg_none_without_signature_is_refused(signer: TokenSigner) -> None:
    unsigned = _b64(b'{"alg":"none"}') + "." + _b64(json.dumps(_claims()).encode()) + "."
    with pytest.raises(AuthenticationError, match="malformed session token"):
        signer.verify(unsigned, fingerprint=FP, now=NOW)


@pytest.mark.parametrize(
    "claims",
    [
        _claims(sub=None),
        _claims(sid=5),
        _claims(iat=True),
        _claims(exp="soon"),
        _claims(exp=10**400),
        _claims(cnf="x"),
        _claims(cnf={"x5t#S256": "é"}),
        [1, 2, 3],
        {},
    ],
)
def test_signed_but_malformed_claims(signer: TokenSigner, claims: Any) -> None:
    with pytest.raises(AuthenticationError, match="malformed session token"):
        signer.verify(_forge({"alg": "HS256"}, claims), fingerprint=FP, now=NOW)


def test_non_finite_numbers_in_claims(signer: TokenSigner) -> None:
    signing_input = (
        _b64(b'{"alg":"HS256"}')
        + "."
        + _b64(json.dumps(_claims(exp=float("inf"))).encode())  # writes Infinity
    )
    sig = _b64(hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest())
    with pytest.raises(AuthenticationError, match="malformed session token"):
        signer.verify(signing_input + "." + sig, fingerprint=FP, now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "..",
        "a..c",
        "é.b.c",
        "a b.c.d",
        "a=.b.c",
        "a+b.c.d",
        _b64(b"\xff\xfe") + ".e30.c",
        _b64(b"[" * 2000) + ".e30.c",  # deep nesting must not escape as RecursionError
        _b64(b"null") + ".e30.c",
        "A.e30.c",  # a single base64 character cannot encode a byte
        None,
        b"a.b.c",
        42,
    ],
)
def test_garbage_is_malformed(signer: TokenSigner, token: Any) -> None:
    with pytest.raises(AuthenticationError, match="malformed session token"):
        signer.verify(token, fingerprint=FP, now=NOW)


def test_oversize_token_is_refused(signer: TokenSigner) -> None:
    token = signer.issue("c" * 2000, FP, "s", ttl_s=60, now=NOW)
    assert len(token) <= MAX_TOKEN_LENGTH
    padded = token + "A" * (MAX_TOKEN_LENGTH + 1 - len(token))
    with pytest.raises(AuthenticationError, match="malformed session token"):
        signer.verify(padded, fingerprint=FP, now=NOW)
    with pytest.raises(ValueError, match="shorten"):
        signer.issue("c" * 4000, FP, "s", ttl_s=60, now=NOW)


def test_signer_construction() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenSigner(b"short")
    with pytest.raises(TypeError):
        TokenSigner("k" * 32)  # type: ignore[arg-type]
    one, two = TokenSigner.generate(), TokenSigner.generate()
    token = one.issue("c1", FP, "s", ttl_s=60)
    with pytest.raises(AuthenticationError):
        two.verify(token, fingerprint=FP)
    assert "k" * 8 not in repr(TokenSigner(KEY)) and "hidden" in repr(one)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fingerprint": "xyz"}, "fingerprint"),
        ({"fingerprint": FP[:-2]}, "fingerprint"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": -5}, "ttl_s"),
        ({"ttl_s": float("nan")}, "ttl_s"),
        ({"now": float("inf")}, "now"),
        ({"subject": None}, "subject"),
        ({"session_id": 3}, "session_id"),
    ],
)
def test_issue_validates(signer: TokenSigner, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"subject": "c1", "fingerprint": FP, "session_id": "s", "ttl_s": 60}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        signer.issue(**args)


def test_verify_rejects_a_malformed_fingerprint_argument(signer: TokenSigner) -> None:
    token = signer.issue("c1", FP, "s", ttl_s=60, now=NOW)
    with pytest.raises(ValueError, match="fingerprint"):
        signer.verify(token, fingerprint="not-hex", now=NOW)


_TOKEN_ALPHABET = st.sampled_from(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(_TOKEN_ALPHABET, max_size=300).map("".join),
        st.tuples(
            st.sampled_from(["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "eyJhbGciOiJub25lIn0"]),
            st.text(_TOKEN_ALPHABET, max_size=100),
        ).map(".".join),
    )
)
def test_random_strings_only_raise_authentication_error(token: str) -> None:
    with pytest.raises(AuthenticationError):
        TokenSigner(KEY).verify(token, fingerprint=FP, now=NOW)
