"""A refused client certificate against a TLS handshake cut short.

With TLS 1.3 gRPC reports both as "Socket closed". A client that took every cut handshake for
a refusal gave up after three (a coordinator restarting at the wrong moment); one that took
every refusal for a cut would retry a wrong certificate for ever. The client now makes one
handshake of its own to tell them apart (``probe_certificate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from flctl.coordinator import Coordinator
from flctl.core.errors import CertificateError
from flctl.security import generate_project_certs, load_credentials
from flctl.transport.grpc import probe_certificate
from tests.relay import Relay

from .conftest import Project, make_runner, wait_until


def _probe(address: str, pem: tuple[bytes, bytes, bytes]) -> str:
    cert, key, ca = pem
    return probe_certificate(address, cert_pem=cert, key_pem=key, ca_pem=ca, timeout=10)


def test_the_probe_tells_an_accepted_certificate_from_a_refused_one(
    project: Project, tmp_path: Path
) -> None:
    config = project.write()
    generate_project_certs(tmp_path / "rogue", ["c1"])
    good = load_credentials(config.certs_path, "c1")
    rogue_cert, rogue_key, _ = load_credentials(tmp_path / "rogue", "c1")

    async def main() -> str:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            assert await asyncio.to_thread(_probe, address, good) == "accepted"
            # a certificate from another CA, presented with our CA to check the server
            rogue = (rogue_cert, rogue_key, good[2])
            assert await asyncio.to_thread(_probe, address, rogue) == "refused"
            # trusting another CA: the probe's own handshake fails on the server's certificate,
            # which gRPC reports in other words; the probe does not call that a refusal
            other_ca = (rogue_cert, rogue_key, load_credentials(tmp_path / "rogue", "c1")[2])
            assert await asyncio.to_thread(_probe, address, other_ca) == "unknown"
            assert coordinator._registry.connected() == []  # type: ignore[union-attr]
        finally:
            await coordinator.stop()
        return address

    address = asyncio.run(main())
    assert _probe(address, good) == "unknown"  # nothing listens there any more


def test_a_handshake_cut_short_is_retried_not_taken_for_a_refusal(project: Project) -> None:
    config = project.write(rounds={"min_clients": 1})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        port = int(address.rsplit(":", 1)[1])
        # the first connection is cut inside the handshake, after part of the server's reply
        relay = Relay(port, cut_first=1, cut_after=200)
        stop = asyncio.Event()
        # one refusal would end this client: the cut must not count as one
        runner = make_runner(config, relay.address, "c1", backoff_cap_s=0.5, max_tls_failures=1)
        task = asyncio.create_task(runner.run(stop))
        try:
            await wait_until(
                lambda: task.done() or coordinator._registry.connected(),  # type: ignore[union-attr]
                timeout=60,
            )
            if task.done():
                task.result()  # re-raises what ended the client
            assert relay.connections >= 3  # the cut one, the probe's, the session's
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
            relay.close()
            await coordinator.stop()

    asyncio.run(main())


def test_a_refused_certificate_still_ends_the_client(project: Project, tmp_path: Path) -> None:
    config = project.write()
    generate_project_certs(tmp_path / "rogue", ["c1"])
    rogue_cert, rogue_key, _ = load_credentials(tmp_path / "rogue", "c1")

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            runner = make_runner(config, address, "c1", backoff_cap_s=0.5, max_tls_failures=2)
            runner._options = dataclasses.replace(
                runner._options, cert_pem=rogue_cert, key_pem=rogue_key
            )
            with pytest.raises(CertificateError, match="does not accept this certificate"):
                await asyncio.wait_for(runner.run(asyncio.Event()), 60)
        finally:
            await coordinator.stop()

    asyncio.run(main())
