"""``flctl serve``: run the coordinator in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from rich.live import Live

from flctl.cli._common import load_project, setup_logging
from flctl.cli._output import Output
from flctl.coordinator import Coordinator
from flctl.core import Event
from flctl.tui import DashboardState, event_line, render_dashboard

__all__ = ["serve"]


async def _serve(coordinator: Coordinator, out: Output, *, tui: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = DashboardState(title="flctl serve")
    live: Live | None = None

    def on_event(event: Event) -> None:
        state.apply(event)
        if live is None:
            out.line(event_line(event))

    coordinator.subscribe(on_event)
    if tui:
        live = Live(
            get_renderable=lambda: render_dashboard(state),
            console=out.console,
            refresh_per_second=4,
            transient=False,
        )
        live.start()
    try:
        await coordinator.start()
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await coordinator.stop("signal" if stop.is_set() else "error")
        if live is not None:
            live.stop()


def serve(
    *, config_path: Path | None, address: str | None, insecure: bool, tui: bool | None
) -> None:
    """Start the coordinator and serve until stopped.

    Args:
        config_path: flctl.toml (default: the nearest one).
        address: Overrides ``server.address``.
        insecure: Plaintext on loopback instead of mutual TLS.
        tui: Live panel (default: when stdout is a terminal).
    """
    config = load_project(config_path)
    out = Output()
    use_tui = out.is_terminal if tui is None else tui
    setup_logging(logging.WARNING if use_tui else logging.INFO)
    coordinator = Coordinator(config, address=address, insecure=insecure or None)
    asyncio.run(_serve(coordinator, out, tui=use_tui))
