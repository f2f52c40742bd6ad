"""The certificate folder's issuance index, ``certs/index.json``: one record per certificate.

Every certificate the project's CA issues (``certs gen``, ``certs issue``, ``certs sign``) is
recorded here, also after its file has been replaced, so that the CA side knows which
identities hold a certificate, and which serials exist, without the certificates themselves
(a signed request's key never reaches the CA; a replaced file is gone). The file is JSON::

    {"version": 1, "certificates": [{"identity", "role", "serial", "fingerprint",
      "not_before", "not_after", "issuer", "ca_fingerprint", "file", "issued_at"}, ...]}

``serial`` is lower-case hex (serials have up to 159 bits, more than JSON numbers carry
safely); times are ISO 8601 in UTC. Writers hold an exclusive ``flock`` on
``certs/.index.lock`` across check and write, and replace the file atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes

from flctl.core.errors import CertificateError
from flctl.security._fileio import CERT_MODE, DIR_MODE, KEY_MODE, write_atomic
from flctl.security._identity import Role, certificate_info, check_name, load_certificate

__all__ = [
    "INDEX_FILE",
    "IssuanceRecord",
    "append_records",
    "fingerprint_of",
    "index_lock",
    "read_index",
    "record_of",
]

INDEX_FILE = "index.json"
"""The index's file name inside the certificate folder."""

_LOCK_FILE = ".index.lock"
_VERSION = 1
_MAX_INDEX_BYTES = 16 << 20
_HEX_RE = re.compile(r"[0-9a-f]{1,40}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.crt")
_FIX_HINT = (
    "restore certs/index.json from a backup, or move it away: `flctl certs ls` still lists the "
    ".crt files, but the index's history of replaced certificates is then lost"
)


@dataclass(frozen=True)
class IssuanceRecord:
    """One certificate the project's CA issued.

    Attributes:
        identity: The subject CN.
        role: The role the certificate carries.
        serial: Its serial number.
        fingerprint: Lower-case hex SHA-256 of its DER bytes.
        not_before: Start of validity (UTC).
        not_after: End of validity (UTC).
        issuer: The issuing CA's common name.
        ca_fingerprint: SHA-256 (hex) of the issuing CA's certificate; a record whose CA is not
            the folder's current CA (after ``certs gen --force``) is no longer trusted.
        file: The file it was written to, relative to the certificate folder (``c7.crt``).
        issued_at: When it was recorded (UTC).
    """

    identity: str
    role: Role
    serial: int
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issuer: str
    ca_fingerprint: str
    file: str
    issued_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """The record as the index stores it."""
        return {
            "identity": self.identity,
            "role": self.role.value,
            "serial": format(self.serial, "x"),
            "fingerprint": self.fingerprint,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "issuer": self.issuer,
            "ca_fingerprint": self.ca_fingerprint,
            "file": self.file,
            "issued_at": self.issued_at.isoformat(),
        }


def record_of(cert_pem: bytes, ca_pem: bytes, file: str) -> IssuanceRecord:
    """Build the index record of a certificate the CA ``ca_pem`` has just issued.

    Args:
        cert_pem: The new certificate.
        ca_pem: The issuing CA's certificate.
        file: Where the certificate is written, relative to the certificate folder.

    Returns:
        The record, stamped now.
    """
    info = certificate_info(cert_pem)
    identity = info.identity
    return IssuanceRecord(
        identity=identity.name,
        role=identity.role,
        serial=identity.serial,
        fingerprint=identity.fingerprint,
        not_before=identity.not_before,
        not_after=identity.not_after,
        issuer=info.issuer,
        ca_fingerprint=fingerprint_of(ca_pem),
        file=file,
        issued_at=datetime.now(UTC),
    )


def fingerprint_of(cert_pem: bytes) -> str:
    """SHA-256 (lower-case hex) of a PEM certificate's DER bytes."""
    return load_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def read_index(certs_dir: Path) -> list[IssuanceRecord]:
    """Read ``certs_dir/index.json``; an absent index is empty.

    Args:
        certs_dir: The certificate folder.

    Returns:
        The records, oldest first.

    Raises:
        CertificateError: The index cannot be read, is too large, or is malformed.
    """
    path = Path(certs_dir) / INDEX_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > _MAX_INDEX_BYTES:
        raise CertificateError(f"{path} is larger than {_MAX_INDEX_BYTES} bytes", hint=_FIX_HINT)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CertificateError(f"{path} is not valid JSON: {exc}", hint=_FIX_HINT) from None
    if (
        not isinstance(document, dict)
        or document.get("version") != _VERSION
        or not isinstance(document.get("certificates"), list)
    ):
        raise CertificateError(
            f"{path} is not a version-{_VERSION} flctl certificate index", hint=_FIX_HINT
        )
    records = []
    for position, item in enumerate(document["certificates"]):
        try:
            records.append(_parse_record(item))
        except (KeyError, TypeError, ValueError) as exc:
            raise CertificateError(
                f"{path}: certificate record {position} is malformed ({exc})", hint=_FIX_HINT
            ) from None
    return records


@contextmanager
def index_lock(certs_dir: Path) -> Iterator[None]:
    """Hold the certificate folder's exclusive lock (creating the folder if needed).

    Everything that checks the folder and then writes to it (issue, sign, gen) holds it, so two
    commands cannot both decide that an identity has no certificate yet. The lock is not
    re-entrant: take it once per operation.

    Raises:
        CertificateError: The folder or the lock file cannot be created.
    """
    certs_dir = Path(certs_dir)
    try:
        certs_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(certs_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, KEY_MODE)
    except OSError as exc:
        raise CertificateError(
            f"cannot lock {certs_dir / _LOCK_FILE}: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def append_records(certs_dir: Path, records: Sequence[IssuanceRecord]) -> None:
    """Add records to the index, atomically; the caller holds :func:`index_lock`.

    Args:
        certs_dir: The certificate folder.
        records: The new records.

    Raises:
        CertificateError: The existing index is malformed, or the file cannot be written.
    """
    if not records:
        return
    existing = read_index(certs_dir)
    document = {
        "version": _VERSION,
        "certificates": [record.to_dict() for record in (*existing, *records)],
    }
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    write_atomic(Path(certs_dir) / INDEX_FILE, data, CERT_MODE)


def _parse_record(item: Any) -> IssuanceRecord:
    if not isinstance(item, dict):
        raise TypeError("not an object")
    serial, fingerprint, ca_fingerprint = (
        item["serial"],
        item["fingerprint"],
        item["ca_fingerprint"],
    )
    for label, value, pattern in (
        ("serial", serial, _HEX_RE),
        ("fingerprint", fingerprint, _FINGERPRINT_RE),
        ("ca_fingerprint", ca_fingerprint, _FINGERPRINT_RE),
        ("file", item["file"], _FILE_RE),
    ):
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise ValueError(f"bad {label} {value!r}")
    issuer = item["issuer"]
    if not isinstance(issuer, str) or len(issuer) > 256:
        raise ValueError(f"bad issuer {issuer!r}")
    return IssuanceRecord(
        identity=check_name(item["identity"]),
        role=Role(item["role"]),
        serial=int(serial, 16),
        fingerprint=fingerprint,
        not_before=_parse_time(item["not_before"]),
        not_after=_parse_time(item["not_after"]),
        issuer=issuer,
        ca_fingerprint=ca_fingerprint,
        file=item["file"],
        issued_at=_parse_time(item["issued_at"]),
    )


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"time {value!r} is not a string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return parsed.astimezone(UTC)
