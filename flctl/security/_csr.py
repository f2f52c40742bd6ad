"""Certificate signing requests: keys never travel.

A client (or another operator) makes its own key and a PKCS#10 request with
:func:`generate_csr`; only the request reaches the CA, which signs it with :func:`sign_csr`.
The request states the identity (its subject CN) and the role it asks for, the same two ways a
certificate does (subject OU and flctl's role extension, requested as an extension). The CA
takes nothing else from the request: validity, key usages and every other extension are its
own, exactly those of :func:`~flctl.security.issue_certificate`.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from flctl.core.errors import CertificateError
from flctl.security._certs import (
    KeyPair,
    _cert_to_pem,
    _check_days,
    _key_to_pem,
    _role_extension,
    _subject,
    build_leaf,
)
from flctl.security._identity import (
    ROLE_OID,
    Role,
    _decode_role_extension,
    _parse_role,
    check_name,
)

__all__ = ["CSR_ROLES", "generate_csr", "sign_csr"]

#: The roles a request may ask for; the server's and the CA's certificates come from ``gen``.
CSR_ROLES = (Role.CLIENT, Role.ADMIN)

# A PEM request is well under 2 KiB; anything far larger is the wrong file.
_MAX_CSR_BYTES = 64 * 1024
_MIN_RSA_BITS = 2048


def generate_csr(name: str, role: Role = Role.CLIENT) -> tuple[bytes, bytes]:
    """Make a fresh key and a signing request for identity ``name`` with ``role``.

    Args:
        name: The identity (the subject CN): 1-64 characters from ``A-Z a-z 0-9 . _ -``,
            starting with a letter or digit.
        role: :attr:`Role.CLIENT` or :attr:`Role.ADMIN`.

    Returns:
        ``(csr_pem, key_pem)``: the request to send to the CA, and the EC P-256 private key
        (unencrypted PKCS#8 PEM) that stays on this machine.

    Raises:
        ValueError: A bad name or role.

    Example:
        >>> csr_pem, key_pem = generate_csr("c7", Role.CLIENT)
        >>> csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
        True
    """
    role = _check_role(role)
    check_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(name, role))
        .add_extension(_role_extension(role), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), _key_to_pem(key)


def csr_identity(csr_pem: bytes) -> tuple[str, Role | None]:
    """Read the identity and requested role of a request, after checking its signature.

    Args:
        csr_pem: One PEM certificate signing request.

    Returns:
        ``(name, role)``; ``role`` is None when the request asks for none (a request made by
        another tool, without OU or role extension).

    Raises:
        CertificateError: The request is unreadable or too large, its signature does not verify,
            its key is weak or of an unsupported type, its subject has no single valid CN, or it
            asks for an unknown role, or for two different ones.
    """
    csr = _load_csr(csr_pem)
    return _csr_name(csr), _requested_role(csr)


def sign_csr(ca: KeyPair, csr_pem: bytes, role: Role, *, days: int = 365) -> bytes:
    """Issue a certificate for a signing request, with the identity from its subject.

    Args:
        ca: The issuing CA's certificate and key.
        csr_pem: The PEM request (from :func:`generate_csr` or any PKCS#10 tool).
        role: The role to grant: :attr:`Role.CLIENT` or :attr:`Role.ADMIN`. A request that asks
            for another role is refused; one that asks for none gets this one.
        days: How long the certificate is valid, from now (cut to the CA's own end).

    Returns:
        The new certificate (PEM), for the request's public key.

    Raises:
        ValueError: A bad ``role`` or ``days``.
        CertificateError: The request is refused (see :func:`csr_identity`), asks for another
            role than ``role``, or the CA is unusable.
    """
    role = _check_role(role)
    _check_days(days)
    csr = _load_csr(csr_pem)
    name = _csr_name(csr)
    requested = _requested_role(csr)
    if requested is not None and requested is not role:
        raise CertificateError(
            f"the request for {name!r} asks for role {requested.value!r}, not {role.value!r}",
            hint=f"sign it with `--role {requested.value}` if that is intended",
        )
    cert = build_leaf(ca, name, role, _public_key(csr), days=days)
    return _cert_to_pem(cert)


def _check_role(role: Role) -> Role:
    if role not in CSR_ROLES:
        raise ValueError(f"role must be client or admin, got {role!r}")
    return Role(role)


def _load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    if not isinstance(csr_pem, bytes | bytearray):
        raise CertificateError(f"request must be PEM bytes, not {type(csr_pem).__name__}")
    if len(csr_pem) > _MAX_CSR_BYTES:
        raise CertificateError(f"request is larger than {_MAX_CSR_BYTES} bytes; not a CSR")
    try:
        csr = x509.load_pem_x509_csr(bytes(csr_pem))
        # Parsed lazily by cryptography: touch them now, so that garbage fails here.
        csr.subject, csr.extensions, csr.public_key()  # noqa: B018
        is_valid = csr.is_signature_valid
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CertificateError(f"not a valid PEM certificate signing request: {exc}") from exc
    if not is_valid:
        raise CertificateError(
            "the request's signature does not verify: it was altered, or not made with the "
            "private key it names"
        )
    return csr


def _public_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise CertificateError(f"the request's EC key on {key.curve.name} is too weak")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CertificateError(
                f"the request's RSA key has {key.key_size} bits; at least {_MIN_RSA_BITS} needed"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CertificateError(f"the request's key type {type(key).__name__} is not supported")


def _csr_name(csr: x509.CertificateSigningRequest) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CertificateError("the request's subject must have exactly one common name (CN)")
    name = names[0].value
    try:
        return check_name(name)
    except ValueError as exc:
        raise CertificateError(f"the request's subject CN is not a valid identity: {exc}") from None


def _requested_role(csr: x509.CertificateSigningRequest) -> Role | None:
    """The role the request asks for (extension and OU must agree), or None if it asks none."""
    try:
        ext = csr.extensions.get_extension_for_oid(ROLE_OID)
    except x509.ExtensionNotFound:
        from_ext = None
    else:
        if not isinstance(ext.value, x509.UnrecognizedExtension):  # pragma: no cover
            raise CertificateError("the request's flctl role extension could not be read")
        from_ext = _parse_role(_decode_role_extension(ext.value.value), "role extension")
    ous = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(ous) > 1:
        raise CertificateError("the request's subject has more than one OU; its role is ambiguous")
    from_ou = _parse_role(str(ous[0].value), "subject OU") if ous else None
    if from_ext is not None and from_ou is not None and from_ext is not from_ou:
        raise CertificateError(
            f"the request's role extension says {from_ext.value!r} "
            f"but its subject OU says {from_ou.value!r}"
        )
    return from_ext or from_ou
