"""The coordinator's listening gRPC server: both services on one port, mTLS by default."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message_factory import GetMessageClass

from flctl.core.errors import ConfigError, ConnectError
from flctl.transport.grpc._channel import channel_options, is_loopback_host, split_address
from flctl.transport.grpc._connections import ConnectionLimits, server_options
from flctl.transport.grpc._health import Health
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._servicers import (
    AdminHandler,
    AdminServicer,
    CoordinatorHandler,
    CoordinatorServicer,
)
from flctl.transport.grpc._tolerant import tolerant
from flctl.transport.grpc._wire import encode_chunk, parse_upload

__all__ = [
    "ServerCredentials",
    "admin_handlers",
    "bind",
    "coordinator_handlers",
    "method_handlers",
    "start_server",
]

#: The method handler for each shape: (client streaming, server streaming).
_SHAPES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(
    service: str,
    servicer: object,
    *,
    decoders: Mapping[str, Callable[[bytes], Any]] | None = None,
    encoders: Mapping[str, Callable[[Any], bytes]] | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """The method handlers of the proto ``service`` (its short name), from its descriptor.

    Each method is served by ``servicer``'s method of the same name, with the shape the proto
    declares and the generated codecs unless ``decoders``/``encoders`` name others. Every
    request decoder is wrapped by :func:`tolerant`: bytes that do not parse reach the servicer
    as a ``Malformed`` request, which it refuses with ``INVALID_ARGUMENT``.
    """
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    decoders, encoders = decoders or {}, encoders or {}
    unknown = (set(decoders) | set(encoders)) - set(descriptor.methods_by_name)
    if unknown:
        raise ValueError(f"{service} has no method {sorted(unknown)}")
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        request = GetMessageClass(method.input_type)
        response = GetMessageClass(method.output_type)
        make = _SHAPES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant(
                decoders.get(method.name, request.FromString), method.input_type.name
            ),
            response_serializer=encoders.get(method.name, response.SerializeToString),
        )
    return handlers


def _coordinator_methods(servicer: CoordinatorServicer) -> dict[str, grpc.RpcMethodHandler]:
    # the data path keeps the hand-framed codecs (same wire bytes, fewer copies)
    return method_handlers(
        "Coordinator",
        servicer,
        decoders={"Upload": parse_upload},
        encoders={"Download": encode_chunk},
    )


def _full_name(service: str) -> str:
    full_name: str = pb.DESCRIPTOR.services_by_name[service].full_name
    return full_name


def coordinator_handlers(servicer: CoordinatorServicer) -> grpc.GenericRpcHandler:
    """The Coordinator service's method table, with the hand-framed codecs on the data path."""
    return grpc.method_handlers_generic_handler(
        _full_name("Coordinator"), _coordinator_methods(servicer)
    )


def admin_handlers(servicer: AdminServicer) -> grpc.GenericRpcHandler:
    """The Admin service's method table."""
    return grpc.method_handlers_generic_handler(
        _full_name("Admin"), method_handlers("Admin", servicer)
    )


@dataclass(frozen=True)
class ServerCredentials:
    """PEM bytes the server presents and the CA it trusts for client certificates."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


async def start_server(
    address: str,
    coordinator: CoordinatorHandler,
    admin: AdminHandler,
    *,
    credentials: ServerCredentials | None,
    max_chunk_bytes: int = 1 << 20,
    allow_admin_clients: bool = False,
    on_refused: Callable[[str, str, str], None] | None = None,
    connection_limits: ConnectionLimits | None = None,
    health: Health | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Bind ``address`` and start serving; return the server and the port actually bound.

    Args:
        address: ``HOST:PORT``; port 0 picks a free port.
        coordinator: Handler of the Coordinator service.
        admin: Handler of the Admin service.
        credentials: Server certificate, key and client CA; ``None`` means ``--insecure``,
            which only loopback addresses accept.
        max_chunk_bytes: The largest data chunk; bounds every message both ways.
        allow_admin_clients: Let admin certificates call the Coordinator service too.
        on_refused: Told ``(identity, rpc, reason)`` of each caller refused for its role.
        connection_limits: The handshake timeout and the total bound on connections (gRPC
            enforces both; :class:`ConnectionWatch` adds the per-peer bound).
        health: The standard health service to serve beside flctl's (its status is the
            caller's to set).

    Raises:
        ConfigError: ``--insecure`` on a non-loopback address.
        ConnectError: The address cannot be bound.
    """
    host, _ = split_address(address)
    insecure = credentials is None
    if insecure and not is_loopback_host(host):
        raise ConfigError(
            f"--insecure refuses to listen on {address!r}: plaintext is for loopback only",
            hint="use mutual TLS (drop --insecure) or bind 127.0.0.1",
        )
    # No SO_REUSEPORT (gRPC's default on Linux): a second coordinator on the same port must be
    # refused, not handed half of the connections by the kernel.
    options = [*channel_options(max_chunk_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(
        options=options + server_options(connection_limits or ConnectionLimits())
    )
    coordinator_servicer = CoordinatorServicer(
        coordinator, insecure=insecure, allow_admin=allow_admin_clients, on_refused=on_refused
    )
    admin_servicer = AdminServicer(admin, insecure=insecure, on_refused=on_refused)
    for service, methods in (
        (_full_name("Coordinator"), _coordinator_methods(coordinator_servicer)),
        (_full_name("Admin"), method_handlers("Admin", admin_servicer)),
    ):
        # generic for any caller, registered for the generated stubs' registered methods
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        server.add_registered_method_handlers(service, methods)
    if health is not None:
        health.add_to(server)
    port = bind(server, address, credentials)
    await server.start()
    return server, port


def bind(server: grpc.aio.Server, address: str, credentials: ServerCredentials | None) -> int:
    """Add ``address`` to ``server`` (mutual TLS, or plaintext when ``credentials`` is None).

    Raises:
        ConnectError: The address cannot be bound (why, in the operating system's words).
    """
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            server_credentials = grpc.ssl_server_credentials(
                [(credentials.key_pem, credentials.cert_pem)],
                root_certificates=credentials.ca_pem,
                require_client_auth=True,
            )
            port = server.add_secure_port(address, server_credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise _bind_failure(address)
    return int(port)


def _bind_failure(address: str) -> ConnectError:
    """Say in plain words why ``address`` cannot be bound (gRPC only says that it cannot).

    One bind of our own, as gRPC binds (SO_REUSEADDR), gives the operating system's reason.
    """
    host, port = split_address(address)
    reason = "the address is in use or not available"
    hint = "pick another with --address HOST:PORT or server.address in flctl.toml"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ConnectError(
            f"cannot listen on {address}: cannot resolve {host!r}",
            hint="use an IP address or a host name of this machine",
        )
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = f"port {port} is already in use (another flctl serve or another program)"
                hint = "stop what listens there, or " + hint
            elif exc.errno == errno.EADDRNOTAVAIL:
                reason = f"{host} is not an address of this machine"
                hint = "listen on an address of this machine (0.0.0.0 for all), or " + hint
            elif exc.errno == errno.EACCES:
                reason = f"no permission to listen on port {port}"
                hint = "ports below 1024 need privileges: " + hint
            else:
                reason = exc.strerror or str(exc)
            break
    return ConnectError(f"cannot listen on {address}: {reason}", hint=hint)
