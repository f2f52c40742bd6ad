"""Issuing and verifying certificates: a CA, server, admin and client certificates as PEM bytes.

Keys are EC P-256 (PKCS#8 PEM, unencrypted), signatures SHA-256. The profile is the one TLS
stacks (grpcio's BoringSSL among them) expect for mutual TLS:

- CA: ``BasicConstraints(ca=True, path_length=0)`` and ``KeyUsage(keyCertSign, cRLSign)``, both
  critical; ``SubjectKeyIdentifier``.
- Leaf: ``BasicConstraints(ca=False)`` and ``KeyUsage(digitalSignature)``, both critical;
  ``ExtendedKeyUsage`` serverAuth (server) or clientAuth (client, admin); subject and authority
  key identifiers; the server's ``SubjectAlternativeName``.

Every certificate also carries its role (see :mod:`flctl.security._identity`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flctl.core.errors import CertificateError
from flctl.security._identity import (
    ROLE_OID,
    Identity,
    Role,
    check_name,
    encode_role,
    extensions_of,
    identity_from_certificate,
    load_certificate,
    load_private_key,
)

__all__ = [
    "KeyPair",
    "check_key_matches",
    "generate_ca",
    "issue_certificate",
    "verify_certificate",
]

# Certificates start a little in the past so that a peer whose clock is slightly behind does not
# refuse a certificate issued a moment ago.
_CLOCK_SKEW = timedelta(minutes=5)
_LEAF_ROLES = (Role.CLIENT, Role.ADMIN, Role.SERVER)
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_RE = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM bytes.

    Attributes:
        cert_pem: The certificate (PEM).
        key_pem: The unencrypted PKCS#8 private key (PEM); left out of ``repr``.
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def generate_ca(common_name: str = "flctl CA", *, days: int = 3650) -> KeyPair:
    """Create a self-signed certificate authority.

    Args:
        common_name: The CA's subject common name (1 to 64 characters).
        days: How long the CA is valid, from now.

    Returns:
        The CA's certificate and key (role :attr:`Role.CA`).

    Raises:
        ValueError: ``common_name`` is empty or too long, or ``days`` is not a positive integer.
    """
    if not isinstance(common_name, str) or not 1 <= len(common_name) <= 64:
        raise ValueError(f"CA common name must be 1-64 characters, got {common_name!r}")
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before = datetime.now(UTC) - _CLOCK_SKEW
    subject = _subject(common_name, Role.CA)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_role_extension(Role.CA), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    return KeyPair(cert_pem=_cert_to_pem(cert), key_pem=_key_to_pem(key))


def issue_certificate(
    ca: KeyPair,
    name: str,
    role: Role,
    *,
    sans: Sequence[str] = (),
    days: int = 365,
    not_before: datetime | None = None,
) -> KeyPair:
    """Issue a server, admin or client certificate signed by ``ca``.

    A server certificate's ``SubjectAlternativeName`` lists each entry of ``sans`` (an IP address
    if it parses as one, else a DNS name) and ``name`` itself when it is a valid DNS name, so that
    a client may also override the target name with the server's name. The certificate never
    outlives the CA: its end is cut to the CA's.

    Args:
        ca: The issuing CA's certificate and key (EC, RSA or Ed25519/Ed448).
        name: The subject common name: 1-64 characters from ``A-Z a-z 0-9 . _ -``, starting with
            a letter or digit.
        role: :attr:`Role.SERVER`, :attr:`Role.ADMIN` or :attr:`Role.CLIENT`.
        sans: Subject alternative names; only for :attr:`Role.SERVER`.
        days: How long the certificate is valid, from ``not_before``.
        not_before: Start of validity (timezone-aware); defaults to a few minutes ago. Tests use
            it to make certificates that are expired or not valid yet.

    Returns:
        The new certificate and its freshly generated key.

    Raises:
        ValueError: A bad name, role, SAN, ``days`` or ``not_before``.
        TypeError: ``sans`` is a single string rather than a sequence of strings.
        CertificateError: ``ca`` is unreadable, not a CA, expired, or its key does not match.
    """
    if role not in _LEAF_ROLES:
        raise ValueError(f"role must be one of client, admin, server; got {role!r}")
    role = Role(role)
    check_name(name)
    _check_days(days)
    if isinstance(sans, str | bytes):
        raise TypeError(f"sans must be a sequence of strings, not a single string: {sans!r}")
    if sans and role is not Role.SERVER:
        raise ValueError(f"only server certificates carry SANs; got sans={list(sans)!r}")
    if not_before is not None and not_before.tzinfo is None:
        raise ValueError(f"not_before must be timezone-aware, got {not_before!r}")

    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_leaf(ca, name, role, key.public_key(), sans=sans, days=days, not_before=not_before)
    return KeyPair(cert_pem=_cert_to_pem(cert), key_pem=_key_to_pem(key))


def build_leaf(
    ca: KeyPair,
    name: str,
    role: Role,
    public_key: CertificatePublicKeyTypes,
    *,
    sans: Sequence[str] = (),
    days: int = 365,
    not_before: datetime | None = None,
) -> x509.Certificate:
    """Sign a leaf certificate for ``public_key`` (arguments already checked by the caller).

    Shared by :func:`issue_certificate` (a fresh key) and CSR signing (the requester's key), so
    both produce exactly the same profile.
    """
    ca_cert, ca_key = _load_ca_pair(ca)
    now = datetime.now(UTC)
    if ca_cert.not_valid_after_utc <= now:
        raise CertificateError(
            f"the CA certificate expired on {ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            hint="regenerate everything with `flctl certs gen --force`",
        )
    start = (now - _CLOCK_SKEW) if not_before is None else not_before.astimezone(UTC)
    end = min(start + timedelta(days=days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise ValueError(f"not_before={not_before!r} is after the CA's end of validity")

    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role is Role.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name, role))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .add_extension(_role_extension(role), critical=False)
    )
    if role is Role.SERVER:
        names = [*sans, name] if _DNS_RE.fullmatch(name) else list(sans)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_general_names(names)), critical=False
        )
    return builder.sign(ca_key, _hash_for(ca_key))


def verify_certificate(cert_pem: bytes, ca_pem: bytes, *, now: datetime | None = None) -> Identity:
    """Check that a certificate was issued by a CA, is valid now and carries a role.

    Args:
        cert_pem: The certificate to check (PEM).
        ca_pem: The CA certificate that must have signed it (PEM).
        now: The time to check validity at (timezone-aware); defaults to the current time.

    Returns:
        The certificate's :class:`Identity`.

    Raises:
        CertificateError: Either certificate is unreadable, ``ca_pem`` is not a CA or is not
            valid at ``now``, the certificate was not signed by that CA, it is expired or not
            valid yet, or it carries no (or a contradictory) role.
        ValueError: ``now`` is naive.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    cert = load_certificate(cert_pem)
    ca_cert = load_certificate(ca_pem, what="CA certificate")
    _require_ca(ca_cert)
    _check_window(ca_cert, now, "the CA certificate")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except ValueError as exc:
        raise CertificateError(
            f"certificate was not issued by this CA: its issuer is "
            f"{cert.issuer.rfc4514_string()!r}, the CA is {ca_cert.subject.rfc4514_string()!r}"
        ) from exc
    except InvalidSignature as exc:
        raise CertificateError(
            "certificate's signature does not verify against this CA "
            "(it was issued by another CA with the same name)"
        ) from exc
    except TypeError as exc:  # pragma: no cover - a CA key type without X.509 signatures
        raise CertificateError(f"certificate's signature cannot be checked: {exc}") from exc
    identity = identity_from_certificate(cert)
    _check_window(cert, now, f"certificate {identity.name!r}")
    return identity


def check_key_matches(cert_pem: bytes, key_pem: bytes) -> None:
    """Check that a private key belongs to a certificate.

    Args:
        cert_pem: The certificate (PEM).
        key_pem: The unencrypted private key (PEM).

    Raises:
        CertificateError: Either is unreadable, or the key is not the certificate's key.
    """
    _check_pair(load_certificate(cert_pem), load_private_key(key_pem), "certificate")


def _load_ca_pair(ca: KeyPair) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """Parse a CA key pair and check that it is a CA whose key matches and can sign."""
    ca_cert = load_certificate(ca.cert_pem, what="CA certificate")
    ca_key = load_private_key(ca.key_pem, what="CA key")
    _require_ca(ca_cert)
    _check_pair(ca_cert, ca_key, "CA certificate")
    if not isinstance(
        ca_key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):  # DSA (deprecated by the crypto library) and X25519/X448 keys do not sign here
        raise CertificateError(f"CA key of type {type(ca_key).__name__} cannot sign certificates")
    return ca_cert, ca_key


def _check_pair(cert: x509.Certificate, key: PrivateKeyTypes, what: str) -> None:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CertificateError(f"the private key does not belong to the {what}")


def _require_ca(cert: x509.Certificate) -> None:
    try:
        constraints = extensions_of(cert).get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError("the CA certificate is not a CA (BasicConstraints ca is not set)")


def _check_window(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{what} is not valid yet (valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)",
            hint="check this machine's clock",
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            hint="issue a new one with `flctl certs gen`",
        )


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")


def _subject(common_name: str, role: Role) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        ]
    )


def _role_extension(role: Role) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(ROLE_OID, encode_role(role))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = extensions_of(ca_cert).get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        if not isinstance(
            public_key,
            ec.EllipticCurvePublicKey
            | rsa.RSAPublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ):  # pragma: no cover - _load_ca_pair already refused such a CA
            raise CertificateError("the CA's public key cannot identify an issuer") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _general_names(entries: Sequence[str]) -> list[x509.GeneralName]:
    """Turn SAN strings into IP or DNS names, refusing bad ones and dropping duplicates."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"SAN entries must be strings, got {entry!r}")
        general: x509.GeneralName
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            if len(entry) > 253 or _DNS_RE.fullmatch(entry) is None:
                raise ValueError(
                    f"invalid SAN {entry!r}: not an IP address nor an ASCII DNS name"
                ) from None
            key = "dns:" + entry.lower()
            general = x509.DNSName(entry)
        else:
            key = f"ip:{address}"
            general = x509.IPAddress(address)
        if key not in seen:
            seen.add(key)
            out.append(general)
    return out


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519 and Ed448 sign the message itself; every other key type signs a SHA-256 digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
