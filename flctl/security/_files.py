"""The project's certificate folder: generating it, and loading credentials from it.

Layout of ``certs/`` (the folder is created ``0700``; keys are ``0600``, certificates ``0644``)::

    ca.crt  ca.key             the project's CA
    server.crt  server.key     the coordinator (CN ``flctl-server``, role server)
    admin.crt  admin.key       the operator (role admin; the name is configurable)
    <id>.crt  <id>.key         one pair per client (role client)

Every file is written atomically (a temporary file in the same folder, fsynced, then renamed),
and a key is created with mode ``0600`` from the start, so it is never readable by others, not
even for a moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from flctl.core.errors import CertificateError, ConfigError
from flctl.security._certs import (
    KeyPair,
    _check_days,
    _check_pair,
    _check_window,
    _general_names,
    _load_ca_pair,
    _require_ca,
    generate_ca,
    issue_certificate,
    verify_certificate,
)
from flctl.security._fileio import (
    CERT_MODE,
    DIR_MODE,
    KEY_MODE,
    fsync_dir,
    read_pem,
    write_atomic,
)
from flctl.security._identity import (
    Role,
    check_name,
    extensions_of,
    load_certificate,
    load_private_key,
)

__all__ = [
    "CertsReport",
    "SERVER_NAME",
    "generate_project_certs",
    "load_ca",
    "load_credentials",
    "load_pem_files",
]

SERVER_NAME = "flctl-server"
"""The common name of the coordinator's certificate (also one of its DNS SANs)."""

_CA_STEM = "ca"
_SERVER_STEM = "server"
_DEFAULT_SERVER_SANS = ("localhost", "127.0.0.1")
_GEN_HINT = "run `flctl certs gen`"


@dataclass(frozen=True)
class CertsReport:
    """What :func:`generate_project_certs` did.

    Attributes:
        certs_dir: The certificate folder.
        written: Files it wrote, relative to ``certs_dir``, in the order written.
        reused: Files it found valid and left untouched, relative to ``certs_dir``.
    """

    certs_dir: Path
    written: list[str]
    reused: list[str]


@dataclass(frozen=True)
class _Leaf:
    stem: str
    name: str
    role: Role
    sans: tuple[str, ...] = ()


def generate_project_certs(
    certs_dir: Path,
    client_ids: Sequence[str],
    *,
    sans: Sequence[str] = (),
    admin_name: str = "admin",
    days: int = 365,
    force: bool = False,
) -> CertsReport:
    """Create or complete a project's certificate folder.

    Without ``force`` the call is incremental: an existing CA is reused, and so is every
    existing certificate that still verifies against it with the right name and role; only
    missing ones are issued, so adding a client never invalidates the others. The server
    certificate is reissued when it lacks a SAN asked for now. An existing certificate that does
    not verify (another CA, expired, half of a pair missing) is an error, never silently replaced.

    With ``force`` everything listed is regenerated, the CA included: every certificate issued
    before stops working. Files of clients not listed are left alone.

    Args:
        certs_dir: The folder; created (mode ``0700``) if missing.
        client_ids: One name per client (``<id>.crt``/``<id>.key``).
        sans: Extra server SANs besides ``localhost``, ``127.0.0.1`` and ``flctl-server``.
        admin_name: Name of the admin certificate (``<admin_name>.crt``).
        days: Validity of the server, admin and client certificates (the CA gets ten years).
        force: Regenerate everything, the CA included.

    Returns:
        Which files were written and which were reused.

    Raises:
        ValueError: A bad name (also ``ca``, ``server`` or a duplicate, ignoring case), SAN or
            ``days``.
        TypeError: ``client_ids`` or ``sans`` is a single string.
        ConfigError: ``certs_dir`` exists and is not a folder.
        CertificateError: The existing CA or a certificate is unreadable or does not verify,
            or a file cannot be written.
    """
    for label, seq in (("client_ids", client_ids), ("sans", sans)):
        if isinstance(seq, str | bytes):
            raise TypeError(f"{label} must be a sequence of strings, not a single string: {seq!r}")
    _check_days(days)
    server_sans = (*_DEFAULT_SERVER_SANS, *sans)
    _general_names(server_sans)  # validates every SAN before anything is written
    leaves = [
        _Leaf(_SERVER_STEM, SERVER_NAME, Role.SERVER, server_sans),
        _Leaf(check_name(admin_name), admin_name, Role.ADMIN),
        *(_Leaf(check_name(cid), cid, Role.CLIENT) for cid in client_ids),
    ]
    seen = {_CA_STEM, _SERVER_STEM}
    for leaf in leaves[1:]:
        folded = leaf.stem.casefold()
        if folded in seen:
            raise ValueError(
                f"name {leaf.stem!r} is reserved or used twice "
                "(names must differ ignoring case, and not be 'ca' or 'server')"
            )
        seen.add(folded)

    certs_dir = Path(certs_dir)
    if certs_dir.exists() and not certs_dir.is_dir():
        raise ConfigError(f"{certs_dir} exists and is not a folder")

    # Decide and issue everything in memory first, so that a refusal writes nothing.
    pending: list[tuple[str, bytes, int]] = []
    reused: list[str] = []
    ca = None if force else _existing_ca(certs_dir)
    is_new_ca = ca is None
    if ca is None:
        ca = generate_ca()
        pending += _pair_files(_CA_STEM, ca)
    else:
        reused += [f"{_CA_STEM}.crt", f"{_CA_STEM}.key"]
    for leaf in leaves:
        existing = None if force else _existing_leaf(certs_dir, ca, leaf, is_new_ca=is_new_ca)
        if existing is None:
            pair = issue_certificate(ca, leaf.name, leaf.role, sans=leaf.sans, days=days)
            pending += _pair_files(leaf.stem, pair)
        else:
            reused += [f"{leaf.stem}.crt", f"{leaf.stem}.key"]

    if not certs_dir.exists():
        try:
            certs_dir.mkdir(mode=DIR_MODE, parents=True)
        except OSError as exc:
            raise CertificateError(f"cannot create {certs_dir}: {exc.strerror or exc}") from exc
    for file_name, data, mode in pending:
        write_atomic(certs_dir / file_name, data, mode)
    fsync_dir(certs_dir)
    return CertsReport(certs_dir=certs_dir, written=[name for name, _, _ in pending], reused=reused)


def load_ca(certs_dir: Path) -> KeyPair:
    """Load the project's CA from ``certs_dir/ca.crt`` and ``certs_dir/ca.key``.

    Args:
        certs_dir: The certificate folder.

    Returns:
        The CA's certificate and key.

    Raises:
        CertificateError: A file is missing (the error names it) or unreadable, the certificate
            is not a CA, or the key does not match it.
    """
    certs_dir = Path(certs_dir)
    ca = KeyPair(
        cert_pem=read_pem(certs_dir / f"{_CA_STEM}.crt", _GEN_HINT),
        key_pem=read_pem(certs_dir / f"{_CA_STEM}.key", _GEN_HINT),
    )
    _load_ca_pair(ca)
    return ca


def load_credentials(certs_dir: Path, name: str) -> tuple[bytes, bytes, bytes]:
    """Load the certificate, key and CA certificate of ``name`` from the certificate folder.

    The files are parsed and the key is checked against the certificate; validity and the
    chain are the TLS handshake's job (or :func:`verify_certificate`'s).

    Args:
        certs_dir: The certificate folder.
        name: ``server``, the admin's name or a client id.

    Returns:
        ``(cert_pem, key_pem, ca_pem)`` from ``<name>.crt``, ``<name>.key`` and ``ca.crt``.

    Raises:
        ValueError: ``name`` is not a valid name.
        CertificateError: A file is missing (the error names it) or unreadable, or the key does
            not match the certificate.
    """
    check_name(name)
    certs_dir = Path(certs_dir)
    return _load_triple(
        certs_dir / f"{name}.crt",
        certs_dir / f"{name}.key",
        certs_dir / f"{_CA_STEM}.crt",
        _GEN_HINT,
    )


def load_pem_files(cert: Path, key: Path, ca: Path) -> tuple[bytes, bytes, bytes]:
    """Load a certificate, its key and a CA certificate from explicit paths.

    Args:
        cert: The certificate file.
        key: Its private key file.
        ca: The CA certificate file.

    Returns:
        ``(cert_pem, key_pem, ca_pem)``.

    Raises:
        CertificateError: A file is missing (the error names it) or unreadable, the CA file is
            not a CA, or the key does not match the certificate.
    """
    return _load_triple(Path(cert), Path(key), Path(ca), "check the --cert, --key and --ca paths")


def _load_triple(cert: Path, key: Path, ca: Path, hint: str) -> tuple[bytes, bytes, bytes]:
    cert_pem, key_pem, ca_pem = (read_pem(path, hint) for path in (cert, key, ca))
    cert_obj = load_certificate(cert_pem, what=str(cert))
    key_obj = load_private_key(key_pem, what=str(key))
    _require_ca(load_certificate(ca_pem, what=str(ca)))
    try:
        _check_pair(cert_obj, key_obj, "certificate")
    except CertificateError:
        raise CertificateError(
            f"the private key {key} does not belong to the certificate {cert}", hint=hint
        ) from None
    return cert_pem, key_pem, ca_pem


def _existing_ca(certs_dir: Path) -> KeyPair | None:
    """Return the folder's CA, None if it has none, or raise if it has half of one."""
    crt, key = certs_dir / f"{_CA_STEM}.crt", certs_dir / f"{_CA_STEM}.key"
    if not crt.exists() and not key.exists():
        return None
    if not (crt.exists() and key.exists()):
        present, missing = (crt, key) if crt.exists() else (key, crt)
        raise CertificateError(
            f"{present} exists but {missing} is missing",
            hint="restore it, or run `flctl certs gen --force` to make a new CA "
            "(every certificate issued so far stops working)",
        )
    ca = load_ca(certs_dir)
    try:
        # Only the validity window: a CA brought from elsewhere need not carry a flctl role.
        _check_window(load_certificate(ca.cert_pem), datetime.now(UTC), "the CA certificate")
    except CertificateError as exc:
        raise CertificateError(
            f"the existing CA in {certs_dir} cannot be used: {exc.message}",
            hint="run `flctl certs gen --force` to make a new CA",
        ) from exc
    return ca


def _existing_leaf(certs_dir: Path, ca: KeyPair, leaf: _Leaf, *, is_new_ca: bool) -> bool | None:
    """Return True if the leaf's files can be reused, None if they are missing; else raise."""
    crt, key = certs_dir / f"{leaf.stem}.crt", certs_dir / f"{leaf.stem}.key"
    hint = (
        f"delete {crt.name} and {key.name} to issue a new pair, or run "
        "`flctl certs gen --force` to regenerate everything"
    )
    if not crt.exists() and not key.exists():
        return None
    if not (crt.exists() and key.exists()):
        present, missing = (crt, key) if crt.exists() else (key, crt)
        raise CertificateError(f"{present} exists but {missing} is missing", hint=hint)
    if is_new_ca:
        raise CertificateError(
            f"{crt} exists but the CA that issued it is gone (no ca.crt/ca.key)", hint=hint
        )
    cert_pem, _, _ = _load_triple(crt, key, certs_dir / f"{_CA_STEM}.crt", hint)
    try:
        identity = verify_certificate(cert_pem, ca.cert_pem)
    except CertificateError as exc:
        raise CertificateError(f"{crt} cannot be reused: {exc.message}", hint=hint) from exc
    if identity.name != leaf.name or identity.role is not leaf.role:
        raise CertificateError(
            f"{crt} is for {identity.name!r} (role {identity.role.value}), "
            f"expected {leaf.name!r} (role {leaf.role.value})",
            hint=hint,
        )
    if leaf.role is Role.SERVER and not _has_sans(cert_pem, leaf):
        return None  # asked for a new SAN: reissue the server's pair (clients trust the CA)
    return True


def _has_sans(cert_pem: bytes, leaf: _Leaf) -> bool:
    cert = load_certificate(cert_pem)
    try:
        present = extensions_of(cert).get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    wanted = _general_names([*leaf.sans, leaf.name])
    return all(name in present for name in wanted)


def _pair_files(stem: str, pair: KeyPair) -> list[tuple[str, bytes, int]]:
    # The key goes first: a crash in between leaves a key without a certificate, which the next
    # run reports, rather than a certificate whose key is lost.
    return [(f"{stem}.key", pair.key_pem, KEY_MODE), (f"{stem}.crt", pair.cert_pem, CERT_MODE)]
