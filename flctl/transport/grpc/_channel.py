"""Channels and listening ports from PEM bytes, with explicit message bounds on both ends."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import grpc
import grpc.aio

from flctl.core.errors import CertificateError, ConfigError, ConnectError, FlctlError

__all__ = [
    "MESSAGE_OVERHEAD",
    "channel_options",
    "closed_during_handshake",
    "explain_closed_handshake",
    "insecure_channel",
    "is_loopback_host",
    "is_loopback_peer",
    "probe_certificate",
    "secure_channel",
    "split_address",
]

#: Room for the fields around a chunk's bytes in one message.
MESSAGE_OVERHEAD = 64 * 1024


def channel_options(max_chunk_bytes: int) -> list[tuple[str, int]]:
    """Options for gRPC bounding every message to one chunk plus its envelope."""
    limit = max_chunk_bytes + MESSAGE_OVERHEAD
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def split_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) and check the port.

    Raises:
        ConfigError: The address is malformed.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)


def split_servers(text: str) -> tuple[str, ...]:
    """The coordinators of ``A,B,...`` (``--server``): each ``HOST:PORT``, in order, once each.

    Raises:
        ConfigError: The list is empty or an address is malformed.
    """
    servers = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not servers:
        raise ConfigError(
            f"no coordinator address in {text!r}", hint="--server HOST:PORT[,HOST:PORT]"
        )
    for server in servers:
        split_address(server)
    return servers


def is_loopback_host(host: str) -> bool:
    """Say whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_peer(peer: str) -> bool:
    """Say whether a gRPC peer string (``ipv4:127.0.0.1:5``, ``ipv6:[::1]:5``) is this machine.

    A Unix socket counts as this machine; anything unreadable does not.
    """
    scheme, _, rest = unquote(peer).partition(":")
    if scheme == "unix":
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    host = rest.rpartition(":")[0] if rest.rpartition(":")[2].isdigit() else rest
    return is_loopback_host(host.strip("[]"))


def secure_channel(
    target: str,
    *,
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    max_chunk_bytes: int = 1 << 20,
) -> grpc.aio.Channel:
    """Open a mutual-TLS channel: we present ``cert_pem`` and trust only ``ca_pem``."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(target, credentials, options=channel_options(max_chunk_bytes))


def insecure_channel(target: str, *, max_chunk_bytes: int = 1 << 20) -> grpc.aio.Channel:
    """Open a plaintext channel (``--insecure``, loopback only).

    Raises:
        ConfigError: ``target`` is not a loopback address.
    """
    host, _ = split_address(target)
    if not is_loopback_host(host):
        raise ConfigError(f"--insecure connects to loopback addresses only, not {target!r}")
    return grpc.aio.insecure_channel(target, options=channel_options(max_chunk_bytes))


#: What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_certificate(
    target: str, *, cert_pem: bytes, key_pem: bytes, ca_pem: bytes, timeout: float = 5.0
) -> Literal["accepted", "refused", "unknown"]:
    """Say whether the coordinator at ``target`` accepts our client certificate.

    With TLS 1.3 the server checks the client's certificate after the client has finished its
    side of the handshake, and gRPC reports a refusal only as "Socket closed", the same words
    as a connection that dropped for any other reason. This makes one handshake of its own and
    sends the HTTP/2 preface: a coordinator that accepts the certificate answers with its
    SETTINGS frame; one that refuses it closes the connection at once. "unknown": the
    coordinator could not be reached, or its own certificate is not one we trust (gRPC says
    so in its own words).
    """
    host, port = split_address(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        # the ssl module loads a key pair from files only: a private folder, gone at once
        with tempfile.TemporaryDirectory(prefix="flctl-probe-") as folder:
            cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert_file.write_bytes(cert_pem)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key_pem)
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ValueError, ssl.SSLError):
        return "unknown"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return "unknown"
    with raw:
        raw.settimeout(timeout)
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except (OSError, ssl.SSLError):
            return "unknown"  # the handshake itself failed: not the refusal gRPC hides
        with tls:
            try:
                tls.sendall(_H2_PREFACE)
                answer = tls.recv(9)
            except TimeoutError:
                return "unknown"
            except (ConnectionError, ssl.SSLError):
                return "refused"  # closed (or reset, or an alert) right after the handshake
            except OSError:
                return "unknown"
            return "accepted" if answer else "refused"


# gRPC's words for a connection the peer closed or reset while the TLS handshake ran.
_CLOSED_MARKERS = ("socket closed", "connection reset", "broken pipe", "end of file")


def closed_during_handshake(message: str) -> bool:
    """Say whether gRPC's ``message`` means the peer closed the connection mid-handshake.

    That is how a TLS 1.3 server refuses a client certificate, and also how a coordinator at its
    connection bound (or restarting) sheds a connection: :func:`probe_certificate` tells which.
    """
    lowered = message.lower()
    return any(marker in lowered for marker in _CLOSED_MARKERS)


def explain_closed_handshake(
    target: str, verdict: Literal["accepted", "refused", "unknown"], error: FlctlError
) -> FlctlError:
    """The error to report for a handshake the coordinator closed, given a probe's verdict."""
    if verdict == "refused":
        return CertificateError(
            f"the coordinator at {target} closed the connection right after the TLS handshake: "
            f"it does not accept this certificate ({error.message})",
            hint="check that the certificate was issued by the coordinator's CA, is still "
            "valid and is not revoked",
        )
    return ConnectError(
        f"the coordinator at {target} closed the connection during the TLS handshake: it is "
        "overloaded (at its connection bound) or restarting",
        hint="try again in a moment; its event log shows connection bounds it applied "
        "(security.refused, rpc connect)",
        details={"grpc": error.message},
    )
