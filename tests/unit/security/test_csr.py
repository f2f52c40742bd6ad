"""Signing requests, and the certificate lifecycle of a project folder (index, issue, sign, ls)."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flctl.core.errors import CertificateError, ConflictError
from flctl.security import (
    INDEX_FILE,
    KeyPair,
    Role,
    certificate_info,
    check_key_matches,
    csr_identity,
    generate_csr,
    generate_project_certs,
    issue_certificate,
    issue_project_certificate,
    list_project_certificates,
    load_ca,
    read_index,
    record_generated,
    sign_csr,
    sign_project_request,
    verify_certificate,
    write_request,
)
from flctl.security._identity import ROLE_OID, encode_role


def _csr(
    subject: list[x509.NameAttribute],
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    role_ext: Role | None = None,
    extra: x509.ExtensionType | None = None,
) -> bytes:
    """A request built by hand, as another tool would make it."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if role_ext is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ROLE_OID, encode_role(role_ext)), critical=False
        )
    if extra is not None:
        builder = builder.add_extension(extra, critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _cn(name: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, name)


def _ou(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, value)


# -- generate_csr / sign_csr ------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.CLIENT, Role.ADMIN])
def test_round_trip(ca: KeyPair, role: Role) -> None:
    csr_pem, key_pem = generate_csr("c7", role)
    assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    assert csr_identity(csr_pem) == ("c7", role)
    cert_pem = sign_csr(ca, csr_pem, role, days=30)
    identity = verify_certificate(cert_pem, ca.cert_pem)
    assert (identity.name, identity.role) == ("c7", role)
    check_key_matches(cert_pem, key_pem)  # the certificate is for the requester's own key
    lifetime = identity.not_after - identity.not_before
    assert timedelta(days=30) - timedelta(seconds=5) <= lifetime <= timedelta(days=30)


def test_signed_profile_is_the_issued_profile(ca: KeyPair) -> None:
    """The CA takes only the key and the name from a request: asking to be a CA gets nothing."""
    csr_pem = _csr([_cn("c7")], extra=x509.BasicConstraints(ca=True, path_length=None))
    signed = x509.load_pem_x509_certificate(sign_csr(ca, csr_pem, Role.CLIENT))
    issued = x509.load_pem_x509_certificate(issue_certificate(ca, "c7", Role.CLIENT).cert_pem)
    assert signed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert {e.oid for e in signed.extensions} == {e.oid for e in issued.extensions}
    eku = signed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert signed.subject == issued.subject
    assert signed.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject


def test_role_mismatch_is_refused(ca: KeyPair) -> None:
    csr_pem, _ = generate_csr("ops", Role.ADMIN)
    with pytest.raises(CertificateError, match="asks for role 'admin', not 'client'") as info:
        sign_csr(ca, csr_pem, Role.CLIENT)
    assert info.value.hint is not None and "--role admin" in info.value.hint
    client_csr, _ = generate_csr("c1", Role.CLIENT)
    with pytest.raises(CertificateError, match="asks for role 'client', not 'admin'"):
        sign_csr(ca, client_csr, Role.ADMIN)


@pytest.mark.parametrize(
    ("subject", "role_ext", "granted"),
    [
        ([_cn("c7")], None, Role.ADMIN),  # asks for no role: gets the one given
        ([_cn("c7"), _ou("admin")], None, Role.ADMIN),  # OU only
        ([_cn("c7")], Role.ADMIN, Role.ADMIN),  # extension only
    ],
)
def test_requested_role_from_either_field(
    ca: KeyPair, subject: list[x509.NameAttribute], role_ext: Role | None, granted: Role
) -> None:
    cert_pem = sign_csr(ca, _csr(subject, role_ext=role_ext), granted)
    assert verify_certificate(cert_pem, ca.cert_pem).role is granted


@pytest.mark.parametrize(
    ("subject", "role_ext", "message"),
    [
        ([_cn("c7"), _ou("client")], Role.ADMIN, "extension says 'admin' but its subject OU"),
        ([_cn("c7"), _ou("client"), _ou("admin")], None, "more than one OU"),
        ([_cn("c7"), _ou("superuser")], None, "unknown role 'superuser'"),
        ([_cn("c7")], Role.SERVER, "asks for role 'server'"),
    ],
)
def test_contradictory_or_unknown_roles_are_refused(
    ca: KeyPair, subject: list[x509.NameAttribute], role_ext: Role | None, message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        sign_csr(ca, _csr(subject, role_ext=role_ext), Role.CLIENT)


def test_bad_signature_is_refused(ca: KeyPair) -> None:
    csr_pem, _ = generate_csr("victim01", Role.CLIENT)
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    assert der.count(b"victim01") == 1
    tampered_der = der.replace(b"victim01", b"attack01")  # same length: still valid DER
    tampered = x509.load_der_x509_csr(tampered_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateError, match="signature does not verify"):
        sign_csr(ca, tampered, Role.CLIENT)
    with pytest.raises(CertificateError, match="signature does not verify"):
        csr_identity(tampered)


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ([_cn("../etc/passwd")], "not a valid identity"),
        ([_cn("has space")], "not a valid identity"),
        ([_cn("-leading-dash")], "not a valid identity"),
        ([_cn("c7@evil.example")], "not a valid identity"),
        ([_ou("client")], "exactly one common name"),
        ([_cn("a"), _cn("b")], "exactly one common name"),
    ],
)
def test_name_validation(ca: KeyPair, subject: list[x509.NameAttribute], message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        sign_csr(ca, _csr(subject), Role.CLIENT)


def test_generate_csr_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="invalid name"):
        generate_csr("bad name")
    with pytest.raises(ValueError, match="client or admin"):
        generate_csr("srv", Role.SERVER)
    with pytest.raises(ValueError, match="client or admin"):
        generate_csr("root", Role.CA)


def test_sign_csr_validates_its_arguments(ca: KeyPair) -> None:
    csr_pem, _ = generate_csr("c1")
    with pytest.raises(ValueError, match="client or admin"):
        sign_csr(ca, csr_pem, Role.SERVER)
    with pytest.raises(ValueError, match="days"):
        sign_csr(ca, csr_pem, Role.CLIENT, days=0)
    not_a_ca = issue_certificate(ca, "c2", Role.CLIENT)
    with pytest.raises(CertificateError, match="not a CA"):
        sign_csr(not_a_ca, csr_pem, Role.CLIENT)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a valid PEM certificate signing request"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not"),
        (b"x" * (64 * 1024 + 1), "larger than"),
        ("a string", "must be PEM bytes"),
    ],
)
def test_garbage_requests(ca: KeyPair, data: bytes, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        sign_csr(ca, data, Role.CLIENT)


def test_request_key_strength(ca: KeyPair) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CertificateError, match="1024 bits"):
        sign_csr(ca, _csr([_cn("c1")], key=weak), Role.CLIENT)
    small_curve = ec.generate_private_key(ec.SECP192R1())
    with pytest.raises(CertificateError, match="too weak"):
        sign_csr(ca, _csr([_cn("c1")], key=small_curve), Role.CLIENT)
    strong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for key in (strong, ed25519.Ed25519PrivateKey.generate()):
        cert_pem = sign_csr(ca, _csr([_cn("c1")], key=key), Role.CLIENT)
        assert verify_certificate(cert_pem, ca.cert_pem).name == "c1"


def test_certificate_info(ca: KeyPair) -> None:
    pair = issue_certificate(ca, "c1", Role.CLIENT, days=10)
    info = certificate_info(pair.cert_pem)
    assert info.issuer == "flctl CA"
    assert info.identity.name == "c1"
    assert 9.9 < info.days_left() <= 10
    later = datetime.now(UTC) + timedelta(days=20)
    assert info.days_left(later) < 0


# -- the project folder -------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    record_generated(folder, generate_project_certs(folder, ["c1"]))
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_certificates_are_indexed_once(certs: Path) -> None:
    records = read_index(certs)
    assert sorted(r.identity for r in records) == ["admin", "c1", "flctl-server"]
    ca_fingerprint = certificate_info((certs / "ca.crt").read_bytes()).identity.fingerprint
    assert {r.ca_fingerprint for r in records} == {ca_fingerprint}
    report = generate_project_certs(certs, ["c1", "c2"])
    added = record_generated(certs, report)
    assert [r.identity for r in added] == ["c2"]
    assert len(read_index(certs)) == 4
    document = json.loads((certs / INDEX_FILE).read_text())
    assert document["version"] == 1
    entry = document["certificates"][0]
    assert set(entry) == {
        "identity",
        "role",
        "serial",
        "fingerprint",
        "not_before",
        "not_after",
        "issuer",
        "ca_fingerprint",
        "file",
        "issued_at",
    }
    assert int(entry["serial"], 16) > 0


def test_issue_writes_a_pair_and_refuses_a_second_without_replace(certs: Path) -> None:
    report = issue_project_certificate(certs, "c7", Role.CLIENT, days=30)
    assert report.written == ["c7.key", "c7.crt"] and report.replaced == []
    assert _mode(certs / "c7.key") == 0o600
    first = (certs / "c7.crt").read_bytes()
    check_key_matches(first, (certs / "c7.key").read_bytes())
    assert report.record.serial == certificate_info(first).identity.serial
    with pytest.raises(ConflictError, match="already has an active certificate") as info:
        issue_project_certificate(certs, "c7", Role.CLIENT)
    assert info.value.hint is not None and f"--serial {report.record.serial:x}" in info.value.hint
    assert (certs / "c7.crt").read_bytes() == first  # a refusal writes nothing

    again = issue_project_certificate(certs, "c7", Role.CLIENT, replace=True)
    assert [e.serial for e in again.replaced] == [report.record.serial]
    listing = list_project_certificates(certs)
    c7 = [e for e in listing.entries if e.name == "c7"]
    assert [e.is_current for e in c7] == [False, True]  # the replaced one stays listed
    assert [e.status() for e in c7] == ["active", "active"]


def test_issue_refusals(certs: Path) -> None:
    for name in ("ca", "server", "flctl-server", "Server"):
        with pytest.raises(ValueError, match="reserved"):
            issue_project_certificate(certs, name, Role.CLIENT)
    with pytest.raises(ValueError, match="invalid name"):
        issue_project_certificate(certs, "../x", Role.CLIENT)
    with pytest.raises(ValueError, match="client or admin"):
        issue_project_certificate(certs, "s2", Role.SERVER)
    with pytest.raises(ConflictError, match="only by case"):
        issue_project_certificate(certs, "C1", Role.CLIENT)
    with pytest.raises(ConflictError, match="active client certificate"):
        issue_project_certificate(certs, "c1", Role.ADMIN, replace=True)
    with pytest.raises(CertificateError, match="is revoked"):
        issue_project_certificate(certs, "c9", Role.CLIENT, revoked=[("c9", None)])
    with pytest.raises(CertificateError, match="not found"):
        issue_project_certificate(certs.parent / "nowhere", "c9", Role.CLIENT)


def test_revoked_or_expired_certificates_are_not_active(certs: Path) -> None:
    serial = certificate_info((certs / "c1.crt").read_bytes()).identity.serial
    report = issue_project_certificate(certs, "c1", Role.CLIENT, revoked=[("c1", serial)])
    assert report.replaced == []
    listing = list_project_certificates(certs, revoked=[("c1", serial)])
    statuses = {e.serial: e.status() for e in listing.entries if e.name == "c1"}
    assert statuses == {serial: "revoked", report.record.serial: "active"}
    far = datetime.now(UTC) + timedelta(days=400)
    assert {e.status(far) for e in listing.entries if e.name == "c1"} == {"revoked", "expired"}
    past = datetime.now(UTC) - timedelta(days=1)
    assert listing.entries[0].status(past) == "not-yet-valid"


def test_request_and_sign(certs: Path, tmp_path: Path) -> None:
    client = tmp_path / "client" / "certs"
    key_path, csr_path = write_request(client, "c7")
    assert _mode(key_path) == 0o600 and _mode(client) == 0o700
    with pytest.raises(ConflictError, match="exists already"):
        write_request(client, "c7")
    report = sign_project_request(certs, csr_path.read_bytes(), Role.CLIENT, days=10)
    assert report.written == ["c7.crt"] and not (certs / "c7.key").exists()
    cert_pem = (certs / "c7.crt").read_bytes()
    check_key_matches(cert_pem, key_path.read_bytes())
    assert verify_certificate(cert_pem, load_ca(certs).cert_pem).name == "c7"
    assert read_index(certs)[-1].identity == "c7"
    with pytest.raises(ConflictError, match="already has an active"):
        sign_project_request(certs, csr_path.read_bytes(), Role.CLIENT)
    with pytest.raises(CertificateError, match="asks for role 'client'"):
        sign_project_request(certs, csr_path.read_bytes(), Role.ADMIN, replace=True)


def test_signing_over_an_issued_pair_removes_its_stale_key(certs: Path, tmp_path: Path) -> None:
    _, csr_path = write_request(tmp_path / "elsewhere", "c1")
    report = sign_project_request(certs, csr_path.read_bytes(), Role.CLIENT, replace=True)
    assert report.removed == ["c1.key"] and not (certs / "c1.key").exists()
    assert len(report.replaced) == 1


@pytest.mark.parametrize("name", ["ca", "server", "flctl-server"])
def test_sign_refuses_reserved_names(certs: Path, name: str) -> None:
    csr_pem = _csr([_cn(name), _ou("client")])
    with pytest.raises(CertificateError, match="reserved"):
        sign_project_request(certs, csr_pem, Role.CLIENT)


def test_sign_refuses_an_unreadable_existing_file_without_replace(certs: Path) -> None:
    (certs / "c8.crt").write_text("not a certificate")
    csr_pem, _ = generate_csr("c8")
    with pytest.raises(ConflictError, match="cannot be read"):
        sign_project_request(certs, csr_pem, Role.CLIENT)
    sign_project_request(certs, csr_pem, Role.CLIENT, replace=True)
    assert certificate_info((certs / "c8.crt").read_bytes()).identity.name == "c8"


def test_listing(certs: Path) -> None:
    (certs / "junk.crt").write_text("junk")
    listing = list_project_certificates(certs, revoked=[("c1", None)])
    assert [p.split(":")[0] for p in listing.problems] == ["junk.crt"]
    names = [e.name for e in listing.entries]
    assert names == ["admin", "c1", "flctl CA", "flctl-server"]
    by_name = {e.name: e for e in listing.entries}
    assert by_name["c1"].status() == "revoked" and by_name["c1"].is_revoked
    assert by_name["flctl CA"].role is Role.CA and by_name["flctl CA"].is_from_ca
    assert all(e.is_current and e.issuer == "flctl CA" for e in listing.entries)
    assert list_project_certificates(certs.parent / "none").entries == []


def test_a_new_ca_makes_old_certificates_untrusted(certs: Path) -> None:
    old_serial = certificate_info((certs / "c1.crt").read_bytes()).identity.serial
    record_generated(certs, generate_project_certs(certs, ["c1"], force=True))
    old = [e for e in list_project_certificates(certs).entries if e.serial == old_serial]
    assert [(e.status(), e.is_current) for e in old] == [("other-ca", False)]
    # Issued by the current CA but written by hand, so not in the index: still recognised.
    by_hand = issue_certificate(load_ca(certs), "c5", Role.CLIENT)
    (certs / "c5.crt").write_bytes(by_hand.cert_pem)
    c5 = [e for e in list_project_certificates(certs).entries if e.name == "c5"]
    assert [e.status() for e in c5] == ["active"]


def test_malformed_index_is_a_clear_error(certs: Path) -> None:
    index = certs / INDEX_FILE
    for text, message in [
        ("{", "not valid JSON"),
        ('{"version": 2, "certificates": []}', "not a version-1"),
        ('{"version": 1, "certificates": [{"identity": "c1"}]}', "record 0 is malformed"),
        ('{"version": 1, "certificates": [7]}', "record 0 is malformed"),
    ]:
        index.write_text(text)
        with pytest.raises(CertificateError, match=message) as info:
            read_index(certs)
        assert info.value.hint is not None
    index.write_text(json.dumps({"version": 1, "certificates": []}))
    assert read_index(certs) == []


def test_concurrent_issues_of_one_identity_yield_one(certs: Path) -> None:
    """The folder lock makes check-then-write atomic: exactly one of two racing issues wins."""
    results: list[str] = []

    def issue() -> None:
        try:
            issue_project_certificate(certs, "c9", Role.CLIENT)
            results.append("ok")
        except ConflictError:
            results.append("refused")

    threads = [threading.Thread(target=issue) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["ok", "refused"]
    assert [r.identity for r in read_index(certs)].count("c9") == 1
    assert os.path.exists(certs / ".index.lock")
