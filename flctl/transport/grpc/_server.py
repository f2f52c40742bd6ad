"""The coordinator's listening gRPC server: both services on one port, mTLS by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from flctl.core.errors import ConfigError, ConnectError
from flctl.transport.grpc._channel import channel_options, is_loopback_host, split_address
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._proto import flctl_pb2_grpc as pb_grpc
from flctl.transport.grpc._servicers import (
    AdminHandler,
    AdminServicer,
    CoordinatorHandler,
    CoordinatorServicer,
)
from flctl.transport.grpc._wire import decode_upload, encode_chunk

__all__ = ["ServerCredentials", "coordinator_handlers", "start_server"]


def coordinator_handlers(servicer: CoordinatorServicer) -> grpc.GenericRpcHandler:
    """The Coordinator service's method table, with the hand-framed codecs on the data path."""
    return grpc.method_handlers_generic_handler(
        "flctl.v1.Coordinator",
        {
            "Join": grpc.unary_unary_rpc_method_handler(
                servicer.Join,
                request_deserializer=pb.JoinRequest.FromString,
                response_serializer=pb.JoinReply.SerializeToString,
            ),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                servicer.Heartbeat,
                request_deserializer=pb.HeartbeatRequest.FromString,
                response_serializer=pb.HeartbeatReply.SerializeToString,
            ),
            "Tasks": grpc.unary_stream_rpc_method_handler(
                servicer.Tasks,
                request_deserializer=pb.TasksRequest.FromString,
                response_serializer=pb.Task.SerializeToString,
            ),
            "Download": grpc.unary_stream_rpc_method_handler(
                servicer.Download,
                request_deserializer=pb.DownloadRequest.FromString,
                response_serializer=encode_chunk,
            ),
            "Upload": grpc.stream_unary_rpc_method_handler(
                servicer.Upload,
                request_deserializer=decode_upload,
                response_serializer=pb.UploadReply.SerializeToString,
            ),
            "BeginUpload": grpc.unary_unary_rpc_method_handler(
                servicer.BeginUpload,
                request_deserializer=pb.UploadHeader.FromString,
                response_serializer=pb.UploadReply.SerializeToString,
            ),
        },
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
    server = grpc.aio.server(options=channel_options(max_chunk_bytes))
    server.add_generic_rpc_handlers(
        (
            coordinator_handlers(
                CoordinatorServicer(
                    coordinator,
                    insecure=insecure,
                    allow_admin=allow_admin_clients,
                    on_refused=on_refused,
                )
            ),
        )
    )
    servicer = AdminServicer(admin, insecure=insecure, on_refused=on_refused)
    pb_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
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
    except RuntimeError as exc:
        raise ConnectError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ConnectError(f"cannot listen on {address}: address in use or not available")
    await server.start()
    return server, port
