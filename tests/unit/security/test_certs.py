from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import flctl.security as security
from flctl.core.errors import CertificateError, ConfigError
from flctl.security import (
    CertsReport,
    KeyPair,
    Role,
    check_key_matches,
    generate_ca,
    generate_project_certs,
    identity_from_pem,
    issue_certificate,
    load_ca,
    load_credentials,
    load_pem_files,
    verify_certificate,
)
from flctl.security._identity import ROLE_OID, encode_role

LEAF_ROLES = [Role.CLIENT, Role.ADMIN, Role.SERVER]


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _custom_pair(
    ca: KeyPair, *, ou: str | list[str] | None, ext: bytes | None, cn: str | None = "odd"
) -> KeyPair:
    """A leaf signed by ``ca`` with a hand-made subject OU and role extension."""
    ca_cert = _cert(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    for unit in [ou] if isinstance(ou, str) else ou or []:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if ext is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(ROLE_OID, ext), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _custom_cert(
    ca: KeyPair, *, ou: str | list[str] | None, ext: bytes | None, cn: str | None = "odd"
) -> bytes:
    return _custom_pair(ca, ou=ou, ext=ext, cn=cn).cert_pem


# --- issuing and verifying ------------------------------------------------------------------


@pytest.mark.parametrize("role", LEAF_ROLES)
def test_chain_verifies_and_identity_reads_back(ca: KeyPair, role: Role) -> None:
    pair = issue_certificate(ca, "node-1", role)
    identity = verify_certificate(pair.cert_pem, ca.cert_pem)
    cert = _cert(pair.cert_pem)
    assert identity.name == "node-1"
    assert identity.role is role
    der = cert.public_bytes(serialization.Encoding.DER)
    assert identity.fingerprint == hashlib.sha256(der).hexdigest()
    assert identity.serial == cert.serial_number
    assert identity.not_before.tzinfo is not None and identity.not_after.tzinfo is not None
    assert identity_from_pem(pair.cert_pem) == identity
    check_key_matches(pair.cert_pem, pair.key_pem)


def test_ca_profile_and_role(ca: KeyPair) -> None:
    cert = _cert(ca.cert_pem)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert identity_from_pem(ca.cert_pem).role is Role.CA
    assert verify_certificate(ca.cert_pem, ca.cert_pem).name == "flctl CA"
    assert b"PRIVATE" not in repr(ca).encode()
    assert serialization.load_pem_private_key(ca.key_pem, password=None)  # PKCS8, unencrypted
    assert ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("role", "usage"),
    [
        (Role.SERVER, ExtendedKeyUsageOID.SERVER_AUTH),
        (Role.CLIENT, ExtendedKeyUsageOID.CLIENT_AUTH),
        (Role.ADMIN, ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_leaf_profile(ca: KeyPair, role: Role, usage: x509.ObjectIdentifier) -> None:
    cert = _cert(issue_certificate(ca, "n1", role).cert_pem)
    ext = cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    key_usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature and not key_usage.key_encipherment
    assert not key_usage.key_cert_sign
    ca_ski = _cert(ca.cert_pem).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.value.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ext.get_extension_for_oid(ROLE_OID).critical
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"


def test_server_sans(ca: KeyPair) -> None:
    sans = ["coord.example.com", "10.0.0.5", "::1", "COORD.example.com", "10.0.0.5"]
    cert = _cert(issue_certificate(ca, "flctl-server", Role.SERVER, sans=sans).cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.com", "flctl-server"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = generate_ca(days=2)
    leaf = issue_certificate(short_ca, "c1", Role.CLIENT, days=365)
    assert (
        identity_from_pem(leaf.cert_pem).not_after == identity_from_pem(short_ca.cert_pem).not_after
    )


def _manual_ca(
    key: Any,
    *,
    start: timedelta = timedelta(days=-1),
    end: timedelta = timedelta(days=10),
    is_ca: bool = True,
) -> KeyPair:
    """A CA made without flctl (no role, maybe no BasicConstraints), as another tool would."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "manual CA")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now + start)
        .not_valid_after(now + end)
    )
    if is_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(key, algorithm)
    return KeyPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["rsa", "ed25519"],
)
def test_foreign_ca_keys_are_supported(make_key: Any) -> None:
    other = _manual_ca(make_key())
    leaf = issue_certificate(other, "c1", Role.CLIENT)
    assert verify_certificate(leaf.cert_pem, other.cert_pem).role is Role.CLIENT
    aki = _cert(leaf.cert_pem).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier is not None


def test_expired_or_non_ca_issuer_is_refused() -> None:
    expired = _manual_ca(
        ec.generate_private_key(ec.SECP256R1()), start=timedelta(days=-10), end=timedelta(days=-1)
    )
    with pytest.raises(CertificateError, match="CA certificate expired") as info:
        issue_certificate(expired, "c1", Role.CLIENT)
    assert info.value.hint is not None and "--force" in info.value.hint
    not_ca = _manual_ca(ec.generate_private_key(ec.SECP256R1()), is_ca=False)
    with pytest.raises(CertificateError, match="not a CA"):
        issue_certificate(not_ca, "c1", Role.CLIENT)


def test_certificate_from_another_ca_is_refused(ca: KeyPair, other_ca: KeyPair) -> None:
    pair = issue_certificate(other_ca, "c1", Role.CLIENT)
    with pytest.raises(CertificateError, match="not issued by this CA"):
        verify_certificate(pair.cert_pem, ca.cert_pem)


def test_same_name_other_ca_is_refused_by_signature(ca: KeyPair, same_name_ca: KeyPair) -> None:
    pair = issue_certificate(same_name_ca, "c1", Role.CLIENT)
    with pytest.raises(CertificateError, match="signature does not verify"):
        verify_certificate(pair.cert_pem, ca.cert_pem)


def test_expired_certificate_is_refused(ca: KeyPair) -> None:
    start = datetime.now(UTC) - timedelta(days=10)
    pair = issue_certificate(ca, "c1", Role.CLIENT, days=1, not_before=start)
    with pytest.raises(CertificateError, match="expired") as info:
        verify_certificate(pair.cert_pem, ca.cert_pem)
    assert info.value.exit_code == 21


def test_not_yet_valid_certificate_is_refused(ca: KeyPair) -> None:
    start = datetime.now(UTC) + timedelta(days=2)
    pair = issue_certificate(ca, "c1", Role.CLIENT, days=5, not_before=start)
    with pytest.raises(CertificateError, match="not valid yet"):
        verify_certificate(pair.cert_pem, ca.cert_pem)
    assert verify_certificate(pair.cert_pem, ca.cert_pem, now=start + timedelta(days=1))


def test_verify_checks_the_ca_window_and_kind(ca: KeyPair) -> None:
    pair = issue_certificate(ca, "c1", Role.CLIENT)
    later = datetime.now(UTC) + timedelta(days=4000)
    with pytest.raises(CertificateError, match="the CA certificate expired"):
        verify_certificate(pair.cert_pem, ca.cert_pem, now=later)
    with pytest.raises(CertificateError, match="not a CA"):
        verify_certificate(pair.cert_pem, pair.cert_pem)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_certificate(pair.cert_pem, ca.cert_pem, now=datetime(2030, 1, 1))


@pytest.mark.parametrize("role", list(Role))
def test_role_from_extension_only_and_ou_only(ca: KeyPair, role: Role) -> None:
    ext_only = _custom_cert(ca, ou=None, ext=encode_role(role))
    ou_only = _custom_cert(ca, ou=role.value, ext=None)
    assert identity_from_pem(ext_only).role is role
    assert identity_from_pem(ou_only).role is role


@pytest.mark.parametrize(
    ("ou", "ext", "match"),
    [
        ("client", encode_role(Role.ADMIN), "disagree|says"),
        (None, None, "no flctl role"),
        ("operator", None, "unknown role 'operator'"),
        (["client", "admin"], None, "more than one OU"),
        (None, b"\x0c\x06admin", "not a DER UTF8String"),
        (None, b"admin", "not a DER UTF8String"),
        (None, b"\x0c\x02\xff\xfe", "not valid UTF-8"),
        (None, b"\x0c\x04root", "unknown role 'root'"),
    ],
)
def test_bad_roles_are_refused(
    ca: KeyPair, ou: str | list[str] | None, ext: bytes | None, match: str
) -> None:
    pem = _custom_cert(ca, ou=ou, ext=ext)
    with pytest.raises(CertificateError, match=match):
        identity_from_pem(pem)
    with pytest.raises(CertificateError, match=match):
        verify_certificate(pem, ca.cert_pem)


def _oid_der(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return bytes([0x06, len(body)]) + bytes(body)


def test_duplicate_role_extensions_are_refused(ca: KeyPair) -> None:
    """A certificate stating its role twice in two extensions must not pick one."""
    ca_cert = _cert(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    twin = ROLE_OID.dotted_string[:-1] + "2"
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dup")]))
        .issuer_name(ca_cert.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.UnrecognizedExtension(ROLE_OID, encode_role(Role.CLIENT)), False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(twin), encode_role(Role.ADMIN)),
            False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(_oid_der(twin)) == 1
    dup = x509.load_der_x509_certificate(
        der.replace(_oid_der(twin), _oid_der(ROLE_OID.dotted_string))
    )
    pem = dup.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateError, match="Duplicate"):
        identity_from_pem(pem)
    with pytest.raises(CertificateError, match="Duplicate"):
        verify_certificate(ca.cert_pem, pem)


def test_subject_without_common_name_is_refused(ca: KeyPair) -> None:
    with pytest.raises(CertificateError, match="exactly one common name"):
        identity_from_pem(_custom_cert(ca, ou="client", ext=None, cn=None))


@pytest.mark.parametrize("junk", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_unparsable_certificate(junk: bytes) -> None:
    with pytest.raises(CertificateError, match="not a valid PEM certificate"):
        identity_from_pem(junk)


def test_non_bytes_certificate() -> None:
    with pytest.raises(CertificateError, match="must be PEM bytes"):
        identity_from_pem("-----BEGIN CERTIFICATE-----")  # type: ignore[arg-type]


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_certificate_error(data: bytes) -> None:
    with pytest.raises(CertificateError):
        identity_from_pem(b"-----BEGIN CERTIFICATE-----\n" + data)
    with pytest.raises(CertificateError):
        identity_from_pem(_pem(data))


_LEAF = issue_certificate(generate_ca(), "c1", Role.CLIENT, sans=())


# Corrupting a name can make e.g. a country name 8 characters long, which cryptography still
# loads, with this warning; anything else must come out as a CertificateError.
@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_certificates_only_raise_certificate_error(data: st.DataObject) -> None:
    der = bytearray(_cert(_LEAF.cert_pem).public_bytes(serialization.Encoding.DER))
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    pem = _pem(bytes(der))
    try:
        identity_from_pem(pem)
    except CertificateError:
        pass
    try:
        verify_certificate(pem, pem)
    except CertificateError:
        pass


@pytest.mark.parametrize("first_byte", [0x80, 0xFF, 0x00])
def test_non_positive_serial_is_refused(first_byte: int) -> None:
    der = bytearray(_cert(_LEAF.cert_pem).public_bytes(serialization.Encoding.DER))
    serial = _cert(_LEAF.cert_pem).serial_number.to_bytes(20, "big").lstrip(b"\0")
    at = der.index(serial)
    der[at : at + len(serial)] = bytes([first_byte]) + bytes(len(serial) - 1)
    with pytest.raises(CertificateError, match="serial number that is not positive"):
        identity_from_pem(_pem(bytes(der)))


def test_key_match(ca: KeyPair) -> None:
    one = issue_certificate(ca, "c1", Role.CLIENT)
    two = issue_certificate(ca, "c2", Role.CLIENT)
    check_key_matches(one.cert_pem, one.key_pem)
    with pytest.raises(CertificateError, match="does not belong"):
        check_key_matches(one.cert_pem, two.key_pem)
    with pytest.raises(CertificateError, match="not a valid PEM private key"):
        check_key_matches(one.cert_pem, b"not a key")
    key = serialization.load_pem_private_key(one.key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(CertificateError, match="encrypted"):
        check_key_matches(one.cert_pem, encrypted)
    with pytest.raises(CertificateError, match="must be PEM bytes"):
        check_key_matches(one.cert_pem, one.key_pem.decode())  # type: ignore[arg-type]


def test_issue_refuses_a_mismatched_ca(ca: KeyPair, other_ca: KeyPair) -> None:
    with pytest.raises(CertificateError, match="does not belong"):
        issue_certificate(KeyPair(ca.cert_pem, other_ca.key_pem), "c1", Role.CLIENT)
    leaf = issue_certificate(ca, "c1", Role.CLIENT)
    with pytest.raises(CertificateError, match="not a CA"):
        issue_certificate(leaf, "c2", Role.CLIENT)


@pytest.mark.parametrize(
    "name", ["", "-a", ".a", "a b", "a/b", "../x", "a" * 65, "é", "a\n", "c1\x00"]
)
def test_bad_names_are_refused(ca: KeyPair, name: str) -> None:
    with pytest.raises(ValueError, match="invalid name") as info:
        issue_certificate(ca, name, Role.CLIENT)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["a", "c1", "A.b_c-d", "9" * 64])
def test_good_names(ca: KeyPair, name: str) -> None:
    assert identity_from_pem(issue_certificate(ca, name, Role.ADMIN).cert_pem).name == name


def test_bad_issue_arguments(ca: KeyPair) -> None:
    with pytest.raises(ValueError, match="role"):
        issue_certificate(ca, "c1", Role.CA)
    with pytest.raises(ValueError, match="only server certificates carry SANs"):
        issue_certificate(ca, "c1", Role.CLIENT, sans=["localhost"])
    with pytest.raises(ValueError, match="invalid SAN"):
        issue_certificate(ca, "s", Role.SERVER, sans=["bad name!"])
    with pytest.raises(ValueError, match="invalid SAN"):
        issue_certificate(ca, "s", Role.SERVER, sans=[""])
    with pytest.raises(ValueError, match="must be strings"):
        issue_certificate(ca, "s", Role.SERVER, sans=[b"localhost"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single string"):
        issue_certificate(ca, "s", Role.SERVER, sans="localhost")
    with pytest.raises(ValueError, match="days"):
        issue_certificate(ca, "c1", Role.CLIENT, days=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_certificate(ca, "c1", Role.CLIENT, not_before=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="after the CA's end"):
        issue_certificate(ca, "c1", Role.CLIENT, not_before=datetime.now(UTC).replace(year=2200))
    with pytest.raises(ValueError, match="common name"):
        generate_ca("")
    with pytest.raises(ValueError, match="days"):
        generate_ca(days=-1)


# --- the project certificate folder -----------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_077")
def test_generate_layout_and_modes(tmp_path: Path) -> None:
    certs = tmp_path / "proj" / "certs"
    report = generate_project_certs(certs, ["c1", "c2"])
    assert isinstance(report, CertsReport)
    expected = {f"{s}.{e}" for s in ("ca", "server", "admin", "c1", "c2") for e in ("crt", "key")}
    assert set(report.written) == expected and report.reused == []
    assert {p.name for p in certs.iterdir()} == expected  # no temporary files left behind
    assert _mode(certs) == 0o700
    for name in expected:
        assert _mode(certs / name) == (0o600 if name.endswith(".key") else 0o644), name
    ca_pem = (certs / "ca.crt").read_bytes()
    for stem, role in [("server", Role.SERVER), ("admin", Role.ADMIN), ("c1", Role.CLIENT)]:
        cert_pem, key_pem, loaded_ca = load_credentials(certs, stem)
        assert loaded_ca == ca_pem
        assert verify_certificate(cert_pem, ca_pem).role is role
        check_key_matches(cert_pem, key_pem)
    assert identity_from_pem((certs / "server.crt").read_bytes()).name == "flctl-server"


def test_generate_server_sans(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"], sans=["coord.example.com", "192.168.1.7"])
    san = (
        _cert((tmp_path / "server.crt").read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "flctl-server",
        "coord.example.com",
    }
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "192.168.1.7",
    }


def test_rerun_reuses_the_ca_and_adds_a_client(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1", "c2"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = generate_project_certs(tmp_path, ["c1", "c2", "c3"])
    assert report.written == ["c3.key", "c3.crt"]
    assert set(report.reused) == set(before)
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    cert_pem, _, ca_pem = load_credentials(tmp_path, "c3")
    assert verify_certificate(cert_pem, ca_pem).name == "c3"


def test_rerun_with_a_new_san_reissues_only_the_server(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    report = generate_project_certs(tmp_path, ["c1"], sans=["coord.example.com"])
    assert report.written == ["server.key", "server.crt"]
    assert "c1.crt" in report.reused and "ca.key" in report.reused


def test_force_regenerates_everything(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    old_client = (tmp_path / "c1.crt").read_bytes()
    old_ca = (tmp_path / "ca.crt").read_bytes()
    report = generate_project_certs(tmp_path, ["c1"], force=True)
    assert report.reused == [] and len(report.written) == 8
    new_ca = (tmp_path / "ca.crt").read_bytes()
    assert new_ca != old_ca
    with pytest.raises(CertificateError):
        verify_certificate(old_client, new_ca)
    assert _mode(tmp_path / "ca.key") == 0o600


@pytest.mark.parametrize(
    ("clients", "admin"),
    [
        (["bad name"], "admin"),
        (["ca"], "admin"),
        (["Server"], "admin"),
        (["c1", "C1"], "admin"),
        (["admin"], "admin"),
        (["c1"], "../admin"),
    ],
)
def test_bad_client_names_write_nothing(tmp_path: Path, clients: list[str], admin: str) -> None:
    certs = tmp_path / "certs"
    with pytest.raises(ValueError):
        generate_project_certs(certs, clients, admin_name=admin)
    assert not certs.exists()


def test_bad_generate_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        generate_project_certs(tmp_path, "c1")
    with pytest.raises(ValueError, match="invalid SAN"):
        generate_project_certs(tmp_path, ["c1"], sans=["not valid!"])
    with pytest.raises(ValueError, match="days"):
        generate_project_certs(tmp_path, ["c1"], days=0)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        generate_project_certs(tmp_path / "file", ["c1"])


def test_half_a_ca_is_an_error(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertificateError, match="ca.key is missing") as info:
        generate_project_certs(tmp_path, ["c1"])
    assert info.value.hint is not None and "--force" in info.value.hint


def test_mismatched_ca_key_is_an_error(tmp_path: Path, other_ca: KeyPair) -> None:
    generate_project_certs(tmp_path, ["c1"])
    (tmp_path / "ca.key").write_bytes(other_ca.key_pem)
    with pytest.raises(CertificateError, match="does not belong"):
        generate_project_certs(tmp_path, ["c1"])
    with pytest.raises(CertificateError, match="does not belong"):
        load_ca(tmp_path)


def test_leaf_from_another_ca_is_not_reused(tmp_path: Path, other_ca: KeyPair) -> None:
    generate_project_certs(tmp_path, ["c1"])
    stranger = issue_certificate(other_ca, "c1", Role.CLIENT)
    (tmp_path / "c1.crt").write_bytes(stranger.cert_pem)
    (tmp_path / "c1.key").write_bytes(stranger.key_pem)
    with pytest.raises(CertificateError, match="c1.crt cannot be reused") as info:
        generate_project_certs(tmp_path, ["c1"])
    assert info.value.hint is not None and "delete c1.crt and c1.key" in info.value.hint


def test_leaf_without_its_key_is_an_error(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    (tmp_path / "c1.key").unlink()
    with pytest.raises(CertificateError, match="c1.key is missing"):
        generate_project_certs(tmp_path, ["c1"])


def test_leaves_without_a_ca_are_not_overwritten(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertificateError, match="CA that issued it is gone"):
        generate_project_certs(tmp_path, ["c1"])
    assert not (tmp_path / "ca.crt").exists()  # nothing was written


def test_leaf_with_wrong_role_is_an_error(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    ca = load_ca(tmp_path)
    admin = issue_certificate(ca, "c1", Role.ADMIN)
    (tmp_path / "c1.crt").write_bytes(admin.cert_pem)
    (tmp_path / "c1.key").write_bytes(admin.key_pem)
    with pytest.raises(CertificateError, match="expected 'c1' \\(role client\\)"):
        generate_project_certs(tmp_path, ["c1"])


def test_load_ca_and_credentials_name_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="ca.crt not found") as info:
        load_ca(tmp_path)
    assert info.value.hint == "run `flctl certs gen`"
    generate_project_certs(tmp_path, ["c1"])
    assert load_ca(tmp_path).cert_pem == (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertificateError, match="c9.crt not found") as info:
        load_credentials(tmp_path, "c9")
    assert info.value.hint == "run `flctl certs gen`"
    with pytest.raises(ValueError, match="invalid name"):
        load_credentials(tmp_path, "../c1")
    (tmp_path / "c1.key").write_bytes((tmp_path / "admin.key").read_bytes())
    with pytest.raises(CertificateError, match="c1.key does not belong"):
        load_credentials(tmp_path, "c1")


def test_load_pem_files(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    cert, key, ca = (tmp_path / n for n in ("c1.crt", "c1.key", "ca.crt"))
    assert load_pem_files(cert, key, ca) == load_credentials(tmp_path, "c1")
    with pytest.raises(CertificateError, match="nope.crt not found") as info:
        load_pem_files(tmp_path / "nope.crt", key, ca)
    assert info.value.hint is not None and "--cert" in info.value.hint
    with pytest.raises(CertificateError, match="not a CA"):
        load_pem_files(cert, key, cert)
    with pytest.raises(CertificateError, match="cannot read"):
        load_pem_files(tmp_path, key, ca)
    big = tmp_path / "big.crt"
    big.write_bytes(b"x" * (2 << 20))
    with pytest.raises(CertificateError, match="larger than"):
        load_pem_files(big, key, ca)


def test_all_is_sorted_and_complete() -> None:
    assert security.__all__ == sorted(security.__all__)
    public = {n for n in vars(security) if not n.startswith("_")}
    public -= {"annotations"}
    assert set(security.__all__) == public


def test_server_without_sans_is_reissued(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    bare = _custom_pair(load_ca(tmp_path), ou="server", ext=None, cn="flctl-server")
    (tmp_path / "server.crt").write_bytes(bare.cert_pem)
    (tmp_path / "server.key").write_bytes(bare.key_pem)
    report = generate_project_certs(tmp_path, ["c1"])
    assert report.written == ["server.key", "server.crt"]
    assert (tmp_path / "server.crt").read_bytes() != bare.cert_pem


def test_expired_ca_in_folder_is_an_error(tmp_path: Path) -> None:
    expired = _manual_ca(
        ec.generate_private_key(ec.SECP256R1()), start=timedelta(days=-10), end=timedelta(days=-1)
    )
    (tmp_path / "ca.crt").write_bytes(expired.cert_pem)
    (tmp_path / "ca.key").write_bytes(expired.key_pem)
    with pytest.raises(CertificateError, match="existing CA .* cannot be used: .*expired"):
        generate_project_certs(tmp_path, ["c1"])


def test_foreign_ca_in_folder_is_used(tmp_path: Path) -> None:
    foreign = _manual_ca(ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "ca.crt").write_bytes(foreign.cert_pem)
    (tmp_path / "ca.key").write_bytes(foreign.key_pem)
    report = generate_project_certs(tmp_path, ["c1"])
    assert report.reused == ["ca.crt", "ca.key"]
    cert_pem, _, ca_pem = load_credentials(tmp_path, "c1")
    assert ca_pem == foreign.cert_pem
    assert verify_certificate(cert_pem, ca_pem).name == "c1"


def test_write_failures_are_certificate_errors(tmp_path: Path) -> None:
    generate_project_certs(tmp_path, ["c1"])
    (tmp_path / "c1.crt").unlink()
    (tmp_path / "c1.crt").mkdir()
    (tmp_path / "c1.crt" / "keep").write_text("x")
    with pytest.raises(CertificateError, match="cannot write .*c1.crt"):
        generate_project_certs(tmp_path, ["c1"], force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CertificateError, match="cannot create"):
        generate_project_certs(tmp_path / "file" / "certs", ["c1"])
