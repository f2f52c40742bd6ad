"""The certificate lifecycle in a project's folder: issue, request, sign, list.

Revocations live in the coordinator's state store, which this package does not reach: callers
pass them in as ``(identity, serial)`` pairs, ``serial`` None meaning every certificate of that
identity (see ``flctl.store.list_revocations``).

A certificate is *active* when it was issued by the folder's current CA, is inside its validity
window and is not revoked. :func:`issue_project_certificate` and :func:`sign_project_request`
refuse an identity that already has an active certificate unless ``replace`` is set; the
replaced certificate stays valid (whoever holds its key can still use it) until it expires or
is revoked, which the returned report says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from flctl.core.errors import CertificateError, ConflictError
from flctl.security._certs import KeyPair, issue_certificate
from flctl.security._csr import csr_identity, generate_csr, sign_csr
from flctl.security._fileio import CERT_MODE, DIR_MODE, KEY_MODE, fsync_dir, read_pem, write_atomic
from flctl.security._files import SERVER_NAME, CertsReport, load_ca
from flctl.security._identity import Role, certificate_info, check_name, load_certificate
from flctl.security._index import (
    IssuanceRecord,
    append_records,
    fingerprint_of,
    index_lock,
    read_index,
    record_of,
)

__all__ = [
    "CertificateEntry",
    "CertsListing",
    "IssueReport",
    "Revocations",
    "issue_project_certificate",
    "list_project_certificates",
    "record_generated",
    "sign_project_request",
    "write_request",
]

Revocations = Iterable[tuple[str, int | None]]
"""Revoked ``(identity, serial)`` pairs; a serial of None revokes every certificate of it."""

# File stems and names that belong to the CA and the coordinator, never to a client or admin.
_RESERVED = frozenset({"ca", "server", SERVER_NAME, "index"})
_CA_FILE = "ca.crt"


@dataclass(frozen=True)
class CertificateEntry:
    """One certificate of the project, as ``flctl certs ls`` lists it.

    Attributes:
        name: The identity (subject CN).
        role: The role it carries.
        serial: Its serial number.
        fingerprint: SHA-256 (hex) of its DER bytes.
        not_before: Start of validity (UTC).
        not_after: End of validity (UTC).
        issuer: The issuer's common name.
        file: Its file in the certificate folder (``c7.crt``).
        is_current: The file still holds this certificate (False once replaced).
        is_from_ca: It was issued by the folder's current CA (the CA itself counts).
        is_revoked: A revocation covers it.
    """

    name: str
    role: Role
    serial: int
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issuer: str
    file: str
    is_current: bool
    is_from_ca: bool
    is_revoked: bool

    def days_left(self, now: datetime | None = None) -> float:
        """Days until it expires (negative once it has)."""
        now = datetime.now(UTC) if now is None else now
        return (self.not_after - now).total_seconds() / 86400.0

    def status(self, now: datetime | None = None) -> str:
        """``active``, ``revoked``, ``other-ca``, ``expired`` or ``not-yet-valid``."""
        now = datetime.now(UTC) if now is None else now
        if self.is_revoked:
            return "revoked"
        if not self.is_from_ca:
            return "other-ca"
        if now >= self.not_after:
            return "expired"
        if now < self.not_before:
            return "not-yet-valid"
        return "active"


@dataclass(frozen=True)
class CertsListing:
    """Every certificate of a folder, and the files that could not be read.

    Attributes:
        certs_dir: The certificate folder.
        entries: Certificates from the index and from ``*.crt`` files, by name then start.
        problems: One line per unreadable ``.crt`` file.
    """

    certs_dir: Path
    entries: list[CertificateEntry]
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IssueReport:
    """What an issue or a sign did.

    Attributes:
        record: The new certificate's index record.
        written: Files written, relative to the certificate folder.
        removed: Files removed (the key of a replaced certificate, which no longer matches).
        replaced: The active certificates the new one replaces; they stay valid until they
            expire or are revoked.
    """

    record: IssuanceRecord
    written: list[str]
    removed: list[str]
    replaced: list[CertificateEntry]


def list_project_certificates(certs_dir: Path, *, revoked: Revocations = ()) -> CertsListing:
    """List the certificates of the index and of the folder's ``*.crt`` files.

    Args:
        certs_dir: The certificate folder (it may not exist: the listing is then empty).
        revoked: Revoked ``(identity, serial)`` pairs.

    Returns:
        The listing; an unreadable ``.crt`` file is a problem line, not an error.

    Raises:
        CertificateError: The index is malformed.
    """
    certs_dir = Path(certs_dir)
    revocations = list(revoked)
    ca_pem = _read_optional(certs_dir / _CA_FILE)
    ca_fingerprint = _safe_fingerprint(ca_pem)
    entries: dict[str, CertificateEntry] = {}
    for record in read_index(certs_dir):
        entries[record.fingerprint] = CertificateEntry(
            name=record.identity,
            role=record.role,
            serial=record.serial,
            fingerprint=record.fingerprint,
            not_before=record.not_before,
            not_after=record.not_after,
            issuer=record.issuer,
            file=record.file,
            is_current=False,
            is_from_ca=ca_fingerprint is not None and record.ca_fingerprint == ca_fingerprint,
            is_revoked=_is_revoked(record.identity, record.serial, revocations),
        )
    problems: list[str] = []
    paths = sorted(certs_dir.glob("*.crt")) if certs_dir.is_dir() else []
    for path in paths:
        try:
            cert_pem = read_pem(path, "")
            info = certificate_info(cert_pem)
        except CertificateError as exc:
            problems.append(f"{path.name}: {exc.message}")
            continue
        identity = info.identity
        known = entries.get(identity.fingerprint)
        entries[identity.fingerprint] = CertificateEntry(
            name=identity.name,
            role=identity.role,
            serial=identity.serial,
            fingerprint=identity.fingerprint,
            not_before=identity.not_before,
            not_after=identity.not_after,
            issuer=info.issuer,
            file=path.name,
            is_current=True,
            is_from_ca=(known is not None and known.is_from_ca) or _issued_by(cert_pem, ca_pem),
            is_revoked=_is_revoked(identity.name, identity.serial, revocations),
        )
    ordered = sorted(entries.values(), key=lambda e: (e.name.casefold(), e.name, e.not_before))
    return CertsListing(certs_dir=certs_dir, entries=ordered, problems=problems)


def issue_project_certificate(
    certs_dir: Path,
    name: str,
    role: Role,
    *,
    days: int = 365,
    replace: bool = False,
    revoked: Revocations = (),
) -> IssueReport:
    """Issue a new key and certificate from the folder's CA: ``<name>.key`` and ``<name>.crt``.

    Args:
        certs_dir: The certificate folder, holding ``ca.crt`` and ``ca.key``.
        name: The identity.
        role: :attr:`Role.CLIENT` or :attr:`Role.ADMIN`.
        days: Validity from now (cut to the CA's end).
        replace: Issue even though the identity has an active certificate.
        revoked: Revoked ``(identity, serial)`` pairs.

    Returns:
        What was written and replaced.

    Raises:
        ValueError: A bad or reserved name, a bad role or ``days``.
        CertificateError: The CA is missing or unusable, or the identity is revoked.
        ConflictError: The identity has an active certificate (and ``replace`` is not set), or
            one with another role.
    """
    if role not in (Role.CLIENT, Role.ADMIN):
        raise ValueError(f"role must be client or admin, got {role!r}")
    _check_new_name(name)
    certs_dir = Path(certs_dir)
    ca = load_ca(certs_dir)
    revocations = list(revoked)
    with index_lock(certs_dir):
        replaced = _check_replace(certs_dir, name, Role(role), replace, revocations)
        pair = issue_certificate(ca, name, Role(role), days=days)
        files = [(f"{name}.key", pair.key_pem, KEY_MODE), (f"{name}.crt", pair.cert_pem, CERT_MODE)]
        return _commit(certs_dir, ca, pair.cert_pem, files, [], replaced)


def sign_project_request(
    certs_dir: Path,
    csr_pem: bytes,
    role: Role,
    *,
    days: int = 365,
    replace: bool = False,
    revoked: Revocations = (),
) -> IssueReport:
    """Sign a request with the folder's CA and write ``<name>.crt`` (the name from the request).

    A ``<name>.key`` left in the folder by an earlier certificate no longer matches and is
    removed (the report lists it).

    Args:
        certs_dir: The certificate folder, holding ``ca.crt`` and ``ca.key``.
        csr_pem: The PEM request.
        role: The role to grant; a request asking for another one is refused.
        days: Validity from now (cut to the CA's end).
        replace: Sign even though the identity has an active certificate.
        revoked: Revoked ``(identity, serial)`` pairs.

    Returns:
        What was written, removed and replaced.

    Raises:
        ValueError: A bad role or ``days``.
        CertificateError: The request is refused (bad signature, bad or reserved name, another
            role), the CA is missing or unusable, or the identity is revoked.
        ConflictError: The identity has an active certificate (and ``replace`` is not set), or
            one with another role.
    """
    if role not in (Role.CLIENT, Role.ADMIN):
        raise ValueError(f"role must be client or admin, got {role!r}")
    name, _ = csr_identity(csr_pem)
    try:
        _check_new_name(name)
    except ValueError as exc:
        raise CertificateError(f"the request cannot be signed: {exc}") from None
    certs_dir = Path(certs_dir)
    ca = load_ca(certs_dir)
    revocations = list(revoked)
    with index_lock(certs_dir):
        # Signing first refuses a request for another role before any question of replacing.
        cert_pem = sign_csr(ca, csr_pem, role, days=days)
        replaced = _check_replace(certs_dir, name, Role(role), replace, revocations)
        stale = certs_dir / f"{name}.key"
        removed = [stale.name] if stale.exists() else []
        return _commit(
            certs_dir, ca, cert_pem, [(f"{name}.crt", cert_pem, CERT_MODE)], removed, replaced
        )


def write_request(
    out_dir: Path, name: str, role: Role = Role.CLIENT, *, replace: bool = False
) -> tuple[Path, Path]:
    """Make a key and a signing request on this machine: ``<name>.key`` (0600), ``<name>.csr``.

    Args:
        out_dir: Where to write them; created (``0700``) if missing.
        name: The identity to ask for.
        role: :attr:`Role.CLIENT` or :attr:`Role.ADMIN`.
        replace: Overwrite an existing ``<name>.key``.

    Returns:
        ``(key_path, csr_path)``.

    Raises:
        ValueError: A bad or reserved name, or a bad role.
        ConflictError: ``<name>.key`` exists and ``replace`` is not set.
        CertificateError: A file cannot be written.
    """
    _check_new_name(name)
    csr_pem, key_pem = generate_csr(name, role)
    out_dir = Path(out_dir)
    key_path, csr_path = out_dir / f"{name}.key", out_dir / f"{name}.csr"
    if key_path.exists() and not replace:
        raise ConflictError(
            f"{key_path} exists already",
            hint="keep using it, or pass --replace to make a new key (its certificate then "
            "needs replacing too)",
        )
    try:
        out_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    write_atomic(key_path, key_pem, KEY_MODE)
    write_atomic(csr_path, csr_pem, CERT_MODE)
    fsync_dir(out_dir)
    return key_path, csr_path


def record_generated(certs_dir: Path, report: CertsReport) -> list[IssuanceRecord]:
    """Add what ``generate_project_certs`` wrote (and older certificates it kept) to the index.

    Args:
        certs_dir: The certificate folder.
        report: The report of the generation.

    Returns:
        The records added (certificates already in the index are skipped).

    Raises:
        CertificateError: The index is malformed or cannot be written.
    """
    certs_dir = Path(certs_dir)
    ca_pem = read_pem(certs_dir / _CA_FILE, "run `flctl certs gen`")
    names = [n for n in (*report.written, *report.reused) if n.endswith(".crt") and n != _CA_FILE]
    with index_lock(certs_dir):
        known = {record.fingerprint for record in read_index(certs_dir)}
        new = []
        for file_name in dict.fromkeys(names):
            record = record_of(read_pem(certs_dir / file_name, ""), ca_pem, file_name)
            if record.fingerprint not in known:
                new.append(record)
        append_records(certs_dir, new)
    return new


def _check_new_name(name: str) -> None:
    check_name(name)
    if name.casefold() in _RESERVED:
        raise ValueError(f"name {name!r} is reserved for the CA and the coordinator")


def _check_replace(
    certs_dir: Path,
    name: str,
    role: Role,
    replace: bool,
    revocations: Sequence[tuple[str, int | None]],
) -> list[CertificateEntry]:
    """Refuse what may not be issued for ``name``; return the active certificates it replaces."""
    if any(who == name and serial is None for who, serial in revocations):
        raise CertificateError(
            f"identity {name!r} is revoked: the coordinator refuses every certificate with that "
            "name",
            hint="issue the certificate under another name",
        )
    listing = list_project_certificates(certs_dir, revoked=revocations)
    for entry in listing.entries:
        if entry.name != name and entry.name.casefold() == name.casefold():
            raise ConflictError(
                f"{name!r} differs from the existing identity {entry.name!r} only by case",
                hint="use the existing name, or one that differs by more than case",
            )
    crt = f"{name}.crt"
    for problem in listing.problems:
        if problem.startswith(f"{crt}:") and not replace:
            raise ConflictError(
                f"{crt} exists but cannot be read ({problem[len(crt) + 2 :]})",
                hint="pass --replace to overwrite it",
            )
    now = datetime.now(UTC)
    active = [e for e in listing.entries if e.name == name and e.status(now) == "active"]
    for entry in active:
        if entry.role is not role:
            raise ConflictError(
                f"{name!r} holds an active {entry.role.value} certificate; "
                f"an identity keeps its role (asked for {role.value})",
                hint=f"revoke it first (`flctl certs revoke {name}`) or choose another name",
            )
    if active and not replace:
        newest = max(active, key=lambda e: e.not_after)
        raise ConflictError(
            f"{name!r} already has an active certificate (serial {newest.serial:x}, "
            f"expires {newest.not_after:%Y-%m-%d %H:%M} UTC)",
            hint="pass --replace to issue a new one (the old one stays valid until it expires "
            f"or is revoked with `flctl certs revoke {name} --serial {newest.serial:x}`)",
        )
    return active


def _commit(
    certs_dir: Path,
    ca: KeyPair,
    cert_pem: bytes,
    files: list[tuple[str, bytes, int]],
    removed: list[str],
    replaced: list[CertificateEntry],
) -> IssueReport:
    """Write the files, drop stale ones, then record the certificate in the index."""
    for file_name, data, mode in files:
        write_atomic(certs_dir / file_name, data, mode)
    for file_name in removed:
        with contextlib.suppress(FileNotFoundError):
            (certs_dir / file_name).unlink()
    fsync_dir(certs_dir)
    record = record_of(cert_pem, ca.cert_pem, files[-1][0])
    append_records(certs_dir, [record])
    return IssueReport(
        record=record,
        written=[file_name for file_name, _, _ in files],
        removed=removed,
        replaced=replaced,
    )


def _is_revoked(name: str, serial: int, revocations: Sequence[tuple[str, int | None]]) -> bool:
    return any(who == name and (s is None or s == serial) for who, s in revocations)


def _read_optional(path: Path) -> bytes | None:
    try:
        return read_pem(path, "")
    except CertificateError:
        return None


def _safe_fingerprint(pem: bytes | None) -> str | None:
    if pem is None:
        return None
    try:
        return fingerprint_of(pem)
    except CertificateError:
        return None


def _issued_by(cert_pem: bytes, ca_pem: bytes | None) -> bool:
    """Whether ``ca_pem`` signed ``cert_pem`` (signature and issuer name only)."""
    if ca_pem is None:
        return False
    try:
        cert, ca_cert = load_certificate(cert_pem), load_certificate(ca_pem)
        if cert.fingerprint(hashes.SHA256()) == ca_cert.fingerprint(hashes.SHA256()):
            return True
        cert.verify_directly_issued_by(ca_cert)
    except (CertificateError, ValueError, TypeError, InvalidSignature):
        return False
    return True
