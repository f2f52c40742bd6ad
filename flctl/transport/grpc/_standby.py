"""What a standby coordinator serves until it leads: a refusal that names the leader.

Every Coordinator and Admin call is refused with :class:`StandbyError` ("standby; leader is
ADDRESS"), which clients given several addresses take as "try the next one"; the health
service says NOT_SERVING. When the standby takes over it stops this server and starts the
coordinator's own on the same address.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from flctl.core.errors import StandbyError
from flctl.transport.grpc._channel import channel_options
from flctl.transport.grpc._health import Health
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._server import ServerCredentials, bind
from flctl.transport.grpc._status import error_metadata

__all__ = ["start_standby_server", "standby_error"]


def standby_error(address: str, leader: str | None) -> StandbyError:
    """The refusal a standby answers with."""
    if leader:
        return StandbyError(
            f"the coordinator at {address} is a standby; the leader is {leader}",
            hint="give clients every coordinator's address (--server A,B): they find the leader",
            details={"leader": leader, "standby": address},
        )
    return StandbyError(
        f"the coordinator at {address} is a standby, and no coordinator leads right now",
        hint="a standby takes over within seconds; try again",
        details={"leader": None, "standby": address},
    )


def _handlers(address: str, leader: Callable[[], str | None]) -> list[grpc.GenericRpcHandler]:
    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        error = standby_error(address, leader())
        context.set_trailing_metadata(error_metadata(error))
        await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await refuse(context)
        return b""  # pragma: no cover - abort raises

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        await refuse(context)
        yield b""  # pragma: no cover - abort raises

    handlers = []
    for name in ("Coordinator", "Admin"):
        service = pb.DESCRIPTOR.services_by_name[name]
        methods: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            shape = (method.client_streaming, method.server_streaming)
            make = {
                (False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler,
            }[shape]
            methods[method.name] = make(streaming if method.server_streaming else unary)
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


async def start_standby_server(
    address: str,
    *,
    credentials: ServerCredentials | None,
    leader: Callable[[], str | None],
    health: Health,
    max_chunk_bytes: int = 1 << 20,
) -> tuple[grpc.aio.Server, int]:
    """Listen on ``address`` as a standby; return the server and the port bound.

    Args:
        address: ``HOST:PORT`` (the one the coordinator serves on once it leads).
        credentials: As :func:`flctl.transport.grpc.start_server` (None: ``--insecure``).
        leader: Called per refused call: the leader's address, or None.
        health: The health service to serve (NOT_SERVING while standing by).
        max_chunk_bytes: Bounds every message, as on the coordinator.

    Raises:
        ConnectError: The address cannot be bound.
    """
    server = grpc.aio.server(options=[*channel_options(max_chunk_bytes), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(tuple(_handlers(address, leader)))
    health.add_to(server)
    await health.set(False)
    port = bind(server, address, credentials)
    await server.start()
    return server, port
