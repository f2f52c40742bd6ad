"""The standard gRPC health service on the coordinator's port, over mutual TLS."""

from __future__ import annotations

import asyncio

from flctl.coordinator import Coordinator
from flctl.security import load_credentials
from flctl.transport.grpc import check_health, probe_health, secure_channel

from .conftest import Project


def test_a_coordinator_serves_then_says_not_serving_while_it_drains(project: Project) -> None:
    config = project.write()
    cert, key, ca = load_credentials(config.certs_path, "admin")

    async def main() -> list[str]:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        channel = secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca)
        seen = []
        try:
            seen.append(await check_health(channel))
            # the blocking probe (flctl status, --server A,B) says the same
            seen.append(
                await asyncio.to_thread(
                    probe_health, address, cert_pem=cert, key_pem=key, ca_pem=ca
                )
            )
            await coordinator.drain(0.1)
            seen.append(await check_health(channel))
        finally:
            await channel.close()
            await coordinator.stop()
        seen.append(
            await asyncio.to_thread(probe_health, address, cert_pem=cert, key_pem=key, ca_pem=ca)
        )
        return seen

    assert asyncio.run(main()) == ["SERVING", "SERVING", "NOT_SERVING", "UNREACHABLE"]


def test_the_health_service_needs_a_certificate_of_the_project(project: Project) -> None:
    """Plaintext or a stranger's certificate gets no answer: the port is mutual TLS."""
    config = project.write()

    async def main() -> tuple[str, str]:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            plain = await asyncio.to_thread(probe_health, address, insecure=True)
            _, _, ca = load_credentials(config.certs_path, "admin")
            anonymous = await asyncio.to_thread(
                probe_health, address, cert_pem=b"", key_pem=b"", ca_pem=ca
            )
            return plain, anonymous
        finally:
            await coordinator.stop()

    assert asyncio.run(main()) == ("UNREACHABLE", "UNREACHABLE")
