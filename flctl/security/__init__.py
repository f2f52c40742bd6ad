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

Secure aggregation (SecAgg+, docs/secagg.md): Shamir secret sharing (:func:`split_secret`,
:func:`recover_secret`), X25519 / HKDF-SHA256 / ChaCha20-Poly1305 share encryption
(:func:`encrypt_share`, :func:`decrypt_share`), the ChaCha20 mask stream (:func:`mask_stream`)
and the round's two state machines, :class:`SecAggClient` and :class:`SecAggServer`, which
exchange the plain dataclasses :class:`SecAggSetup`, :class:`KeyAdvertisement`, ... so the
engine and the transport never import ``cryptography``.
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
from flctl.security._masking import (
    MASK_SEED_BYTES,
    MaskTerm,
    apply_mask_terms,
    mask_dtype,
    mask_stream,
)
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
from flctl.security._secagg import (
    EncryptedShare,
    X25519KeyPair,
    check_public_key,
    decrypt_share,
    derive_mask_seed,
    derive_share_key,
    encrypt_share,
)
from flctl.security._secagg_client import SecAggClient
from flctl.security._secagg_messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    SecAggSetup,
    SecAggStage,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from flctl.security._secagg_server import SecAggResult, SecAggServer
from flctl.security._secagg_wire import (
    SECAGG_TASK_KEY,
    SecAggTask,
    decode_key_advertisement,
    decode_masked_input_request,
    decode_share_keys_reply,
    decode_share_keys_request,
    decode_unmask_reply,
    decode_unmask_request,
    encode_message,
)
from flctl.security._shamir import SHAMIR_PRIME, ShamirShare, recover_secret, split_secret
from flctl.security._tokens import MAX_TOKEN_LENGTH, TokenClaims, TokenSigner

__all__ = [
    "CertificateEntry",
    "CertificateInfo",
    "CertsListing",
    "CertsReport",
    "EncryptedShare",
    "INDEX_FILE",
    "Identity",
    "IssuanceRecord",
    "IssueReport",
    "KeyAdvertisement",
    "KeyPair",
    "MASK_SEED_BYTES",
    "MAX_TOKEN_LENGTH",
    "MaskTerm",
    "MaskedInputRequest",
    "Role",
    "SECAGG_TASK_KEY",
    "SERVER_NAME",
    "SHAMIR_PRIME",
    "SecAggClient",
    "SecAggResult",
    "SecAggServer",
    "SecAggSetup",
    "SecAggStage",
    "SecAggTask",
    "ShamirShare",
    "ShareKeysReply",
    "ShareKeysRequest",
    "TokenClaims",
    "TokenSigner",
    "UnmaskReply",
    "UnmaskRequest",
    "X25519KeyPair",
    "apply_mask_terms",
    "certificate_info",
    "check_key_matches",
    "check_public_key",
    "csr_identity",
    "decode_key_advertisement",
    "decode_masked_input_request",
    "decode_share_keys_reply",
    "decode_share_keys_request",
    "decode_unmask_reply",
    "decode_unmask_request",
    "decrypt_share",
    "derive_mask_seed",
    "derive_share_key",
    "encode_message",
    "encrypt_share",
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
    "mask_dtype",
    "mask_stream",
    "read_index",
    "record_generated",
    "recover_secret",
    "sign_csr",
    "sign_project_request",
    "split_secret",
    "verify_certificate",
    "write_request",
]
