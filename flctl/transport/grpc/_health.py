"""The standard gRPC health service (grpc.health.v1) on the coordinator's port.

SERVING on the leader; NOT_SERVING on a standby and while the leader drains, so that a load
balancer or a Kubernetes gRPC probe routes clients to the one coordinator that serves. The
overall status ("") and each of flctl's services (``flctl.v1.Coordinator``,
``flctl.v1.Admin``) are set together. The port is mutual TLS like the rest: a probe presents a
certificate of the project's CA.
"""

from __future__ import annotations

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from flctl.core.errors import ConnectError
from flctl.transport.grpc._proto import flctl_pb2 as pb

__all__ = ["Health", "check_health", "find_leader", "probe_health"]

_SERVICES = (
    "",
    pb.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class Health:
    """One server's health service; starts NOT_SERVING."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self.is_serving = False

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the service on ``server`` (before it starts)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        """SERVING or NOT_SERVING, overall and for both of flctl's services."""
        self.is_serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in _SERVICES:
            await self.servicer.set(name, status)


async def check_health(channel: grpc.aio.Channel, timeout: float = 5.0) -> str:
    """Ask a coordinator's health service: "SERVING", "NOT_SERVING" (or another status name).

    Raises:
        grpc.RpcError: The coordinator cannot be reached (the caller maps it).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def probe_health(
    address: str,
    *,
    cert_pem: bytes = b"",
    key_pem: bytes = b"",
    ca_pem: bytes = b"",
    insecure: bool = False,
    timeout: float = 3.0,
) -> str:
    """One coordinator's health, by a blocking call.

    Returns:
        "SERVING", "NOT_SERVING", or "UNREACHABLE" (nothing answers, or the TLS handshake
        fails).
    """
    if insecure:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        channel = grpc.secure_channel(address, credentials)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        channel.close()


def find_leader(
    servers: tuple[str, ...],
    *,
    cert_pem: bytes = b"",
    key_pem: bytes = b"",
    ca_pem: bytes = b"",
    insecure: bool = False,
    timeout: float = 3.0,
) -> str:
    """The address among ``servers`` whose health service says SERVING (the leader).

    Raises:
        ConnectError: None serves (each address's state is named).
    """
    seen = []
    for address in servers:
        status = probe_health(
            address,
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=ca_pem,
            insecure=insecure,
            timeout=timeout,
        )
        if status == "SERVING":
            return address
        seen.append(f"{address}: {_WORDS.get(status, status.lower())}")
    raise ConnectError(
        f"no coordinator of {', '.join(servers)} leads now ({'; '.join(seen)})",
        hint="a standby takes over within seconds of a leader's loss; is `flctl serve` running?",
        details={"servers": list(servers)},
    )


_WORDS = {"NOT_SERVING": "standby or draining", "UNREACHABLE": "unreachable"}
