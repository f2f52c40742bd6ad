"""Channels and listening ports from PEM bytes, with explicit message bounds on both ends."""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote

import grpc
import grpc.aio

from flctl.core.errors import ConfigError

__all__ = [
    "MESSAGE_OVERHEAD",
    "channel_options",
    "insecure_channel",
    "is_loopback_host",
    "is_loopback_peer",
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
