"""Certificates, identities, roles and session tokens: the one home of ``cryptography``.

Everything crosses this package's border as PEM bytes, so that ``transport`` can build TLS
credentials from them without importing ``cryptography``.

Role encoding: a certificate states its role (``client``, ``admin``, ``server`` or ``ca``) twice.

- The subject's ``OrganizationalUnitName`` (OU) is the role's value, visible to any TLS tool.
- A non-critical extension with OID ``2.25.195139702004034198723160602002407159307.1`` holds
  the role's value as a DER ``UTF8String``. The OID sits under a UUID-derived arc (ITU-T X.667),
  which needs no registration.

:func:`identity_from_pem` reads the extension first and falls back to the OU; it raises
:class:`~flctl.core.errors.CertificateError` if both are absent or they disagree.

Keys are EC P-256 (unencrypted PKCS#8 PEM) with SHA-256 signatures. The CA has
``BasicConstraints(ca=True, path_length=0)`` and ``KeyUsage(keyCertSign, cRLSign)``; leaf
certificates have ``BasicConstraints(ca=False)``, ``KeyUsage(digitalSignature)``, the
``ExtendedKeyUsage`` of their role (serverAuth or clientAuth), subject and authority key
identifiers and, for the server, subject alternative names.

Lifecycle: :func:`generate_project_certs` makes a project's folder; later identities come from
:func:`issue_project_certificate` (a key made by the CA side) or from a signing request made on
the holder's machine (:func:`write_request`, :func:`generate_csr`) and signed by the CA
(:func:`sign_project_request`, :func:`sign_csr`), so that keys never travel. Every certificate
the CA issues is recorded in ``certs/index.json`` (:func:`read_index`), and
:func:`list_project_certificates` says which are active, expired, replaced or revoked.
"""

from flctl.security._certs import (
    KeyPair,
    check_key_matches,
    generate_ca,
    issue_certificate,
    verify_certificate,
)
from flctl.security._csr import csr_identity, generate_csr, sign_csr
from flctl.security._files import (
    SERVER_NAME,
    CertsReport,
    generate_project_certs,
    load_ca,
    load_credentials,
    load_pem_files,
)
from flctl.security._identity import (
    CertificateInfo,
    Identity,
    Role,
    certificate_info,
    identity_from_pem,
)
from flctl.security._index import INDEX_FILE, IssuanceRecord, read_index
from flctl.security._project import (
    CertificateEntry,
    CertsListing,
    IssueReport,
    issue_project_certificate,
    list_project_certificates,
    record_generated,
    sign_project_request,
    write_request,
)
from flctl.security._tokens import MAX_TOKEN_LENGTH, TokenClaims, TokenSigner

__all__ = [
    "CertificateEntry",
    "CertificateInfo",
    "CertsListing",
    "CertsReport",
    "INDEX_FILE",
    "Identity",
    "IssuanceRecord",
    "IssueReport",
    "KeyPair",
    "MAX_TOKEN_LENGTH",
    "Role",
    "SERVER_NAME",
    "TokenClaims",
    "TokenSigner",
    "certificate_info",
    "check_key_matches",
    "csr_identity",
    "generate_ca",
    "generate_csr",
    "generate_project_certs",
    "identity_from_pem",
    "issue_certificate",
    "issue_project_certificate",
    "list_project_certificates",
    "load_ca",
    "load_credentials",
    "load_pem_files",
    "read_index",
    "record_generated",
    "sign_csr",
    "sign_project_request",
    "verify_certificate",
    "write_request",
]
