"""``flctl dashboard``: the web dashboard, an Admin client of the coordinator like the CLI."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

from flctl.cli._options import ConfigOpt, ServerOpt
from flctl.cli._output import Output, command

__all__ = ["dashboard_command"]


def _split_address(text: str) -> tuple[str, int]:
    from flctl.core.errors import InvalidInputError

    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInputError(f"--address must be HOST:PORT, not {text!r}")
    return host, int(port)


@command(json_param=None)
def dashboard_command(
    address: Annotated[
        str,
        typer.Option(
            metavar="HOST:PORT",
            help="Where to serve the web page (loopback by default; any other address needs "
            "--tls-cert/--tls-key and a login with the token printed at start).",
        ),
    ] = "127.0.0.1:8080",
    server: ServerOpt = None,
    allow_actions: Annotated[
        bool,
        typer.Option(
            "--allow-actions",
            help="Offer rollback, tag, cancel, evict and revoke (each confirmed, audited with "
            "the admin certificate's identity).",
        ),
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option(metavar="PEM", help="HTTPS certificate for the page.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(metavar="PEM", help="Its private key.")] = None,
    admin: Annotated[
        str,
        typer.Option(metavar="NAME", help="The admin certificate to call the coordinator with."),
    ] = "admin",
    config_path: ConfigOpt = None,
) -> None:
    """Serve a live web page of rounds, clients, models and events.

    It reads the coordinator through the Admin service (--server A,B: the leader among them,
    followed across a take-over) and shows each event within a second, without reloading.
    """
    from flctl.cli._common import admin_client, coordinator_address, load_project, setup_logging
    from flctl.dashboard import Access, DashboardOptions, run_dashboard
    from flctl.transport.grpc import AdminClient

    config = load_project(config_path)
    host, port = _split_address(address)
    options = DashboardOptions(
        host=host, port=port, allow_actions=allow_actions, tls_cert=tls_cert, tls_key=tls_key
    )
    out = Output()
    setup_logging()

    async def connect() -> tuple[AdminClient, str]:
        leader, _ = await asyncio.to_thread(coordinator_address, config, server)
        return admin_client(config, leader, admin=admin), leader  # on this loop: grpc.aio

    def on_ready(url: str, access: Access) -> None:
        out.line(f"dashboard: {url}")
        if access.login_required:
            out.line(f"login token: {access.token}")
        out.line(
            "actions: on (each confirmed on the page)" if access.allow_actions else "actions: off"
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_dashboard(options, connect, on_ready=on_ready, stop=stop)

    asyncio.run(main())
