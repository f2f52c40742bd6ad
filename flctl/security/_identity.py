"""Roles, identities, and reading them back from certificates.

A certificate states its role twice, so that a reader can check one against the other:

- the subject's ``OrganizationalUnitName`` (OU) is the role's value (``client``, ``admin``,
  ``server`` or ``ca``), readable by any TLS tool (``openssl x509 -subject``);
- a non-critical X.509 extension, :data:`ROLE_OID`, whose ``extnValue`` is the role's value as a
  DER ``UTF8String``. TLS stacks ignore it (it is not critical); flctl reads it first.

:func:`identity_from_pem` refuses a certificate that has neither, or whose two statements
disagree.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from flctl.core.errors import CertificateError

__all__ = [
    "CertificateInfo",
    "Identity",
    "ROLE_OID",
    "Role",
    "certificate_info",
    "identity_from_pem",
]

# A private arc that needs no registration: ITU-T X.667 lets anyone who generates a UUID use
# 2.25.<uuid as an integer> as their own OID root. flctl's root is the UUID below; arc .1 is the
# role extension. (1.3.6.1.4.1.57264 is Sigstore's enterprise number, so it is not used.)
_FLCTL_OID_ROOT = "2.25.195139702004034198723160602002407159307"
ROLE_OID = x509.ObjectIdentifier(f"{_FLCTL_OID_ROOT}.1")
"""OID of flctl's role extension; its value is the role as a DER ``UTF8String``."""

_PEM_CERT_RE = re.compile(
    rb"-----BEGIN (?:X509 )?CERTIFICATE-----(.*?)-----END (?:X509 )?CERTIFICATE-----", re.DOTALL
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UTF8STRING_TAG = 0x0C


class Role(StrEnum):
    """What a certificate's holder may do: its value is what the certificate carries."""

    CLIENT = "client"
    ADMIN = "admin"
    SERVER = "server"
    CA = "ca"


@dataclass(frozen=True)
class Identity:
    """Who a certificate names, read from the certificate alone.

    Attributes:
        name: The subject's common name (a client id, ``admin``, ``flctl-server``...).
        role: The role the certificate carries.
        fingerprint: Lower-case hex SHA-256 of the certificate's DER bytes.
        serial: The certificate's serial number.
        not_before: Start of the validity window (timezone-aware, UTC).
        not_after: End of the validity window (timezone-aware, UTC).
    """

    name: str
    role: Role
    fingerprint: str
    serial: int
    not_before: datetime
    not_after: datetime


def identity_from_pem(cert_pem: bytes) -> Identity:
    """Read the identity a PEM certificate states, without checking who signed it.

    Use :func:`verify_certificate` for anything that crosses a trust boundary; this function only
    parses.

    Args:
        cert_pem: One PEM certificate (the first one is read if there are several).

    Returns:
        The certificate's :class:`Identity`.

    Raises:
        CertificateError: The bytes are not a PEM certificate, the subject has no single common
            name, or the certificate carries no role, an unknown one, or two that disagree.
    """
    cert = load_certificate(cert_pem)
    return identity_from_certificate(cert)


@dataclass(frozen=True)
class CertificateInfo:
    """What ``flctl certs ls`` shows of one certificate: its identity, issuer and expiry.

    Attributes:
        identity: Name, role, fingerprint, serial and validity window.
        issuer: The issuer's common name (its full RFC 4514 name if it has no CN).
    """

    identity: Identity
    issuer: str

    def days_left(self, now: datetime | None = None) -> float:
        """Days until the certificate expires (negative once it has); ``now`` defaults to now."""
        now = datetime.now(UTC) if now is None else now
        return (self.identity.not_after - now).total_seconds() / 86400.0


def certificate_info(cert_pem: bytes) -> CertificateInfo:
    """Read a PEM certificate's identity and issuer, without checking who signed it.

    Args:
        cert_pem: One PEM certificate.

    Returns:
        Its :class:`CertificateInfo`.

    Raises:
        CertificateError: As :func:`identity_from_pem`.
    """
    cert = load_certificate(cert_pem)
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(names[0].value) if names else cert.issuer.rfc4514_string()
    return CertificateInfo(identity=identity_from_certificate(cert), issuer=issuer)


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Build the :class:`Identity` of a parsed certificate (see :func:`identity_from_pem`)."""
    try:
        name = _single_attribute(cert, NameOID.COMMON_NAME, "common name (CN)")
    except ValueError as exc:  # pragma: no cover - cryptography parses names when loading
        raise CertificateError(f"certificate's subject is malformed: {exc}") from exc
    return Identity(
        name=name,
        role=_role_of(cert),
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def extensions_of(cert: x509.Certificate) -> x509.Extensions:
    """Return a certificate's extensions, or raise :class:`CertificateError` if they are bad.

    cryptography parses extensions lazily, and a duplicate extension raises an exception that
    is not a ``ValueError``; this is the one place that turns all of them into ours.
    """
    try:
        return cert.extensions
    except (  # pragma: no cover - load_certificate has parsed them already
        ValueError,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        raise CertificateError(f"certificate has malformed extensions: {exc}") from exc


def load_certificate(cert_pem: bytes, *, what: str = "certificate") -> x509.Certificate:
    """Parse one PEM certificate, or raise :class:`CertificateError` naming ``what``."""
    if not isinstance(cert_pem, bytes | bytearray):
        raise CertificateError(f"{what} must be PEM bytes, not {type(cert_pem).__name__}")
    if _has_non_positive_serial(bytes(cert_pem)):
        raise CertificateError(f"{what} has a serial number that is not positive (RFC 5280)")
    try:
        cert = x509.load_pem_x509_certificate(bytes(cert_pem))
        # cryptography parses these lazily; touch them now so that a malformed certificate fails
        # here, as a CertificateError, and not later in the middle of a check.
        cert.subject, cert.issuer, cert.extensions, cert.public_key()  # noqa: B018
    except (
        ValueError,
        UnsupportedAlgorithm,
        TypeError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        raise CertificateError(f"{what} is not a valid PEM certificate: {exc}") from exc
    return cert


def _has_non_positive_serial(pem: bytes) -> bool:
    """Whether the first PEM certificate's serial number is zero or negative.

    cryptography loads such a certificate with a deprecation warning (an error in a future
    release, and in a test run that turns warnings into errors); we refuse it up front instead,
    which needs no process-wide warning filters. Anything unparsable is left to cryptography.
    """
    match = _PEM_CERT_RE.search(pem)
    if match is None:
        return False
    try:
        der = base64.b64decode(match.group(1))
        _, body, _ = _der_tlv(der, 0, expect=0x30)  # Certificate
        _, body, _ = _der_tlv(der, body, expect=0x30)  # TBSCertificate
        tag, start, end = _der_tlv(der, body)
        if tag == 0xA0:  # [0] version, then the serial
            tag, start, end = _der_tlv(der, end)
    except (binascii.Error, ValueError, IndexError):
        return False
    serial = der[start:end]
    return tag == 0x02 and (not serial or serial[0] & 0x80 != 0 or not any(serial))


def _der_tlv(der: bytes, pos: int, *, expect: int | None = None) -> tuple[int, int, int]:
    """Read one DER tag and length at ``pos``; return (tag, content start, content end)."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if (expect is not None and tag != expect) or pos + length > len(der):
        raise ValueError("unexpected DER")
    return tag, pos, pos + length


def load_private_key(key_pem: bytes, *, what: str = "private key") -> PrivateKeyTypes:
    """Parse one unencrypted PEM private key, or raise :class:`CertificateError`."""
    if not isinstance(key_pem, bytes | bytearray):
        raise CertificateError(f"{what} must be PEM bytes, not {type(key_pem).__name__}")
    try:
        return serialization.load_pem_private_key(bytes(key_pem), password=None)
    except TypeError as exc:
        # cryptography raises TypeError for a key that is encrypted and no password was given.
        raise CertificateError(f"{what} is encrypted; flctl needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{what} is not a valid PEM private key: {exc}") from exc


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid identity name, else raise :class:`ValueError`.

    A name is 1 to 64 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit,
    so that it is also a safe file name (``<name>.crt``).
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def encode_role(role: Role) -> bytes:
    """Return the role extension's value: the role as a DER ``UTF8String``."""
    raw = role.value.encode("utf-8")
    # Role values are short, so the DER length is always the one-byte short form.
    return bytes([_UTF8STRING_TAG, len(raw)]) + raw


def _decode_role_extension(value: bytes) -> str:
    if (
        len(value) < 2
        or value[0] != _UTF8STRING_TAG
        or value[1] >= 0x80
        or value[1] != len(value) - 2
    ):
        raise CertificateError("certificate's flctl role extension is not a DER UTF8String")
    try:
        return value[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CertificateError("certificate's flctl role extension is not valid UTF-8") from exc


def _parse_role(value: str, where: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise CertificateError(f"certificate's {where} names an unknown role {value!r}") from None


def _role_of(cert: x509.Certificate) -> Role:
    try:
        ext = extensions_of(cert).get_extension_for_oid(ROLE_OID)
    except x509.ExtensionNotFound:
        from_ext = None
    else:
        if not isinstance(ext.value, x509.UnrecognizedExtension):  # pragma: no cover
            raise CertificateError("certificate's flctl role extension could not be read")
        from_ext = _parse_role(_decode_role_extension(ext.value.value), "role extension")

    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(ous) > 1:
        raise CertificateError("certificate's subject has more than one OU; its role is ambiguous")
    from_ou = _parse_role(str(ous[0].value), "subject OU") if ous else None

    if from_ext is None:
        if from_ou is None:
            raise CertificateError(
                "certificate carries no flctl role (neither the role extension nor a subject OU)",
                hint="issue it with `flctl certs gen`",
            )
        return from_ou
    if from_ou is not None and from_ou != from_ext:
        raise CertificateError(
            f"certificate's role extension says {from_ext.value!r} "
            f"but its subject OU says {from_ou.value!r}"
        )
    return from_ext


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    attrs = cert.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        raise CertificateError(f"certificate's subject must have exactly one {label}")
    value = attrs[0].value
    if not isinstance(value, str) or not value:  # pragma: no cover - only hand-made DER
        raise CertificateError(f"certificate's subject {label} is empty or not text")
    return value
