"""The certificate lifecycle as a user runs it: `flctl certs ...` as subprocesses in a project.

Ends with a signed certificate doing real mutual TLS against a grpc.aio server that holds the
project's server certificate and requires client certificates.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from flctl.security import Role, generate_ca, issue_certificate
from flctl.store import SqlStore, list_revocations

from .conftest import flctl, init_project, one_json

pytestmark = pytest.mark.timeout(300)


def ok(*args: str, cwd: Path) -> Any:
    """Run a command with --json; it must succeed and print one JSON document."""
    return one_json(flctl(*args, "--json", cwd=cwd, check=True).stdout)


def refused(*args: str, cwd: Path, exit_code: int) -> dict[str, Any]:
    result = flctl(*args, "--json", cwd=cwd)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    error: dict[str, Any] = one_json(result.stdout)["error"]
    return error


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certificate_lifecycle(tmp_path: Path) -> None:
    project = init_project(tmp_path, "p")
    certs = project / "certs"
    ok("certs", "gen", cwd=project)

    # issue: a new client later; a second one for the same identity needs --replace
    issued = ok("certs", "issue", "--client-id", "c7", cwd=project)
    assert issued["identity"] == "c7" and issued["role"] == "client"
    assert issued["written"] == ["c7.key", "c7.crt"] and _mode(certs / "c7.key") == 0o600
    error = refused("certs", "issue", "--client-id", "c7", cwd=project, exit_code=73)
    assert error["code"] == "conflict" and "already has an active certificate" in error["message"]
    assert "--replace" in error["hint"]
    replaced = ok("certs", "issue", "--client-id", "c7", "--replace", cwd=project)
    assert [r["serial"] for r in replaced["replaced"]] == [issued["serial"]]
    admin = ok("certs", "issue", "--admin", "ops", "--days", "3", cwd=project)
    assert admin["role"] == "admin"
    assert refused("certs", "issue", cwd=project, exit_code=10)["code"] == "config"
    reserved = refused("certs", "issue", "--client-id", "server", cwd=project, exit_code=10)
    assert "reserved" in reserved["message"]

    # request on the client's machine (no project, no CA), sign on the CA side
    client = tmp_path / "client"
    client.mkdir()
    request = ok("certs", "request", "--client-id", "c9", "--out", "certs", cwd=client)
    key_path, csr_path = client / "certs" / "c9.key", client / "certs" / "c9.csr"
    assert (request["key"], request["csr"]) == ("certs/c9.key", "certs/c9.csr")
    assert _mode(key_path) == 0o600 and csr_path.exists()
    assert "flctl certs sign c9.csr --role client" in request["next"]
    wrong_role = refused(
        "certs", "sign", str(csr_path), "--role", "admin", cwd=project, exit_code=21
    )
    assert "asks for role 'client', not 'admin'" in wrong_role["message"]
    signed = ok("certs", "sign", str(csr_path), "--role", "client", "--days", "30", cwd=project)
    assert signed["identity"] == "c9" and signed["written"] == ["c9.crt"]
    assert not (certs / "c9.key").exists()  # the key never travelled
    refused("certs", "sign", str(csr_path), "--role", "client", cwd=project, exit_code=73)
    tampered = client / "tampered.csr"
    tampered.write_bytes(csr_path.read_bytes().replace(b"MIIB", b"MIIC", 1))
    refused("certs", "sign", str(tampered), "--role", "client", cwd=project, exit_code=21)

    # ls: every certificate, the replaced one too, and a warning for ops (3 days left)
    listing = ok("certs", "ls", cwd=project)
    assert set(listing) == {"certs_dir", "certificates", "revocations", "warnings"}
    rows = listing["certificates"]
    assert set(rows[0]) == {
        "identity",
        "role",
        "serial",
        "fingerprint",
        "issuer",
        "not_before",
        "not_after",
        "days_left",
        "status",
        "revoked",
        "current",
        "file",
    }
    by_serial = {row["serial"]: row for row in rows}
    assert by_serial[issued["serial"]]["current"] is False
    assert by_serial[replaced["serial"]]["current"] is True
    assert by_serial[signed["serial"]]["status"] == "active"
    assert 2.9 < by_serial[admin["serial"]]["days_left"] <= 3
    names = {row["identity"] for row in rows}
    assert names == {"admin", "c1", "c2", "c3", "c7", "c9", "ops", "flctl CA", "flctl-server"}
    assert [w for w in listing["warnings"] if w.startswith("ops's certificate")]
    assert len(listing["warnings"]) == 1
    text = flctl("certs", "ls", cwd=project, check=True)
    assert "warning: ops's certificate (ops.crt) expires in" in text.stderr
    assert signed["serial"] in text.stdout

    # revoke, offline: recorded in the store as local, with its event; ls shows it
    revoked = ok("certs", "revoke", "c7", "--reason", "lost laptop", cwd=project)
    assert revoked["identity"] == "c7" and revoked["serial"] is None
    assert revoked["author"] == "local" and revoked["already_revoked"] is False
    one = ok("certs", "revoke", "c9", "--serial", signed["serial"], cwd=project)
    assert one["serial"] == signed["serial"]
    with SqlStore.open(project / ".flctl") as store:
        records = list_revocations(store)
        events = store.events_since(0)
    assert [(r.identity, r.reason, r.author) for r in records] == [
        ("c7", "lost laptop", "local"),
        ("c9", "", "local"),
    ]
    assert [e.type for e in events] == ["identity.revoked", "identity.revoked"]
    assert events[0].seq == revoked["event_seq"]
    after = ok("certs", "ls", cwd=project)
    statuses = {row["serial"]: row["status"] for row in after["certificates"]}
    assert statuses[issued["serial"]] == statuses[replaced["serial"]] == "revoked"
    assert statuses[signed["serial"]] == "revoked"
    assert [r["identity"] for r in after["revocations"]] == ["c7", "c9"]
    assert refused("certs", "revoke", "nobody", cwd=project, exit_code=71)["code"] == "not_found"
    refused("certs", "revoke", "c1", "--serial", "xyz", cwd=project, exit_code=10)
    refused("certs", "revoke", "c1", "--serial", signed["serial"], cwd=project, exit_code=71)
    gone = refused("certs", "issue", "--client-id", "c7", "--replace", cwd=project, exit_code=21)
    assert "is revoked" in gone["message"]

    # a running coordinator holds its lock: the revocation must go through its Admin service,
    # never the store; here none answers at the address it published, so nothing is written
    (project / ".flctl" / "serve.json").write_text(
        json.dumps({"pid": os.getpid(), "address": "127.0.0.1:1"})
    )
    with (project / ".flctl" / "coordinator.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = refused("certs", "revoke", "c1", cwd=project, exit_code=31)
    assert busy["code"] == "unavailable"
    with SqlStore.open(project / ".flctl") as store:
        assert len(list_revocations(store)) == 2

    # the signed certificate really works for mutual TLS (revocation is the coordinator's check,
    # not the handshake's); one from another CA is refused at the handshake
    key_pem = key_path.read_bytes()
    cert_pem = (certs / "c9.crt").read_bytes()
    ca_pem = (certs / "ca.crt").read_bytes()
    assert asyncio.run(_mtls_call(certs, cert_pem, key_pem, ca_pem)) == b"c9"
    stranger = issue_certificate(generate_ca(), "c9", Role.CLIENT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_mtls_call(certs, stranger.cert_pem, stranger.key_pem, ca_pem))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_request_defaults_to_the_project_certs_folder(tmp_path: Path) -> None:
    init_project(tmp_path, "p")
    made = ok("certs", "request", "--admin", "ops2", cwd=tmp_path / "p")
    assert Path(made["key"]) == tmp_path / "p" / "certs" / "ops2.key"
    again = refused("certs", "request", "--admin", "ops2", cwd=tmp_path / "p", exit_code=73)
    assert "exists already" in again["message"]
    no_ca = refused(
        "certs", "sign", made["csr"], "--role", "admin", cwd=tmp_path / "p", exit_code=21
    )
    assert "ca.crt not found" in no_ca["message"]


async def _mtls_call(certs: Path, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> bytes:
    """One unary call to a bare grpc.aio server with the project's server certificate."""

    async def whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return bytes(context.auth_context()["x509_common_name"][0])

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.crt").read_bytes())],
        root_certificates=ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials) as channel:
            call = channel.unary_unary("/test.Echo/WhoAmI")
            reply: bytes = await call(b"", timeout=10)
            return reply
    finally:
        await server.stop(None)
