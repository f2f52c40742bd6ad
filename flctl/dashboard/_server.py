"""Serve the dashboard with uvicorn on a socket bound here (so a bad address is our error)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from flctl.core.errors import ConnectError, InvalidInputError
from flctl.dashboard._app import create_app
from flctl.dashboard._hub import EventHub
from flctl.dashboard._security import Access
from flctl.dashboard._source import AdminSource, Connect

__all__ = ["DashboardOptions", "is_loopback", "run_dashboard"]

log = logging.getLogger("flctl.dashboard")


@dataclass(frozen=True)
class DashboardOptions:
    """How ``flctl dashboard`` serves.

    Attributes:
        host: The address to bind.
        port: The port (0: any free one).
        allow_actions: Offer and perform the operator's actions.
        tls_cert: The HTTPS certificate (PEM), required off loopback.
        tls_key: Its private key (PEM).
    """

    host: str
    port: int
    allow_actions: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConnectError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="choose another --address (port in use, or not an address of this machine)",
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def run_dashboard(
    options: DashboardOptions,
    connect: Connect,
    *,
    on_ready: Callable[[str, Access], None],
    stop: asyncio.Event,
) -> None:
    """Serve the dashboard until ``stop`` is set.

    Off loopback it requires TLS (``tls_cert``/``tls_key``) and a login with the token it
    prints (``on_ready`` gets the URL and the :class:`Access` holding it).

    Raises:
        InvalidInputError: A non-loopback address without TLS, or TLS files that do not load.
        ConnectError: The address cannot be bound.
    """
    loopback = is_loopback(options.host)
    tls = options.tls_cert is not None or options.tls_key is not None
    if not loopback and not tls:
        raise InvalidInputError(
            f"the dashboard serves {options.host} (not loopback) only over HTTPS with a login",
            hint="give --tls-cert and --tls-key, or bind 127.0.0.1 and use an SSH tunnel",
        )
    if tls:
        if options.tls_cert is None or options.tls_key is None:
            raise InvalidInputError("--tls-cert and --tls-key go together")
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInputError(f"cannot load the TLS certificate and key: {exc}") from None
    access = Access(
        login_required=not loopback, secure_cookies=tls, allow_actions=options.allow_actions
    )
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    shown = f"[{options.host}]" if ":" in options.host else options.host
    hosts = frozenset(
        {f"{shown}:{port}"}
        | ({f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"} if loopback else set())
    )
    source = AdminSource(connect)
    hub = EventHub(source)
    app = create_app(source, hub, access, hosts=hosts)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=str(options.tls_cert) if tls else None,
        ssl_keyfile=str(options.tls_key) if tls else None,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    hub.start()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if serving.done():
            await serving
        on_ready(f"{'https' if tls else 'http'}://{shown}:{port}/", access)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        server.should_exit = True
        await asyncio.wait({serving}, timeout=3)
        await hub.stop()
        await source.close()
        sock.close()
