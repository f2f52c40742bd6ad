"""``flctl serve``: run the coordinator in the foreground until SIGTERM or Ctrl-C.

The first signal drains: no new round starts (queued rounds stay queued for the next start),
the running round gets ``--drain-timeout`` seconds to commit, then it is failed cleanly, every
client's session is ended (they back off and reconnect to the next coordinator) and the
process exits 0. A second signal stops at once.

With ``--metrics-address`` a :class:`~flctl.observe.MetricsCollector` hears every event too,
and its ``/metrics`` listens before the coordinator starts (a standby serves it, with
``flctl_leader`` 0). With ``--log-format json`` and no live panel, the events are JSON log
lines on stderr instead of plain lines on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rich.live import Live

from flctl.cli._common import load_project, setup_logging
from flctl.cli._output import Output, settings
from flctl.coordinator import Coordinator
from flctl.core import Event
from flctl.observe import MetricsCollector, MetricsServer, log_event
from flctl.tui import DashboardState, event_line, is_notable, render_dashboard

__all__ = ["serve"]

log = logging.getLogger("flctl.serve")
#: The logger of ``serve``'s event lines in ``--log-format json``.
events_log = logging.getLogger("flctl.events")


async def _serve(coordinator: Coordinator, out: Output, *, tui: bool, drain_timeout: float) -> None:
    stop = asyncio.Event()
    now = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (now if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    state = DashboardState(title="flctl serve")
    live: Live | None = None

    json_lines = settings.log_format == "json"

    def on_event(event: Event) -> None:
        state.apply(event)
        if live is None and is_notable(event):  # the run's story, not every heartbeat
            if json_lines:
                # the plain line without its HH:MM:SS: the JSON line has the event's own time
                log_event(events_log, event, event_line(event).split(" ", 1)[-1])
            else:
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
    lost: BaseException | None = None
    try:
        # a standby waits inside start() until it leads: a signal ends the wait
        if not await _first(coordinator.start(), stop.wait()):
            return
        lost_event = coordinator.leadership_lost
        if lost_event is None:
            await stop.wait()
        elif not await _first(stop.wait(), lost_event.wait()):
            # the leadership is gone: stop at once (nothing left to drain), then say why
            lost = coordinator.election.lost if coordinator.election is not None else None
        if lost is None and drain_timeout > 0:
            drain = asyncio.create_task(coordinator.drain(drain_timeout))
            second = asyncio.create_task(now.wait())
            await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
            second.cancel()
            if not drain.done():
                drain.cancel()
    finally:
        with contextlib.suppress(Exception):
            await coordinator.stop("signal" if stop.is_set() else "error")
        if live is not None:
            live.stop()
    if lost is not None:
        raise lost


async def _first(main: Coroutine[Any, Any, Any], other: Coroutine[Any, Any, Any]) -> bool:
    """Await ``main`` unless ``other`` ends first; True when ``main`` ended (its errors rise)."""
    first = asyncio.create_task(main)
    second = asyncio.create_task(other)
    try:
        await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (first, second):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if first.done() and not first.cancelled():
        first.result()
        return True
    return False


def serve(
    *,
    config_path: Path | None,
    address: str | None,
    insecure: bool,
    tui: bool | None,
    drain_timeout: float = 30.0,
    new_state: bool = False,
    advertise: str | None = None,
    metrics_address: str | None = None,
    metrics_allow_remote: bool = False,
) -> None:
    """Start the coordinator and serve until stopped.

    Args:
        config_path: flctl.toml (default: the nearest one).
        address: Overrides ``server.address``.
        insecure: Plaintext on loopback instead of mutual TLS.
        tui: Live panel (default: when stdout is a terminal).
        drain_timeout: Seconds the running round gets to end after the first signal.
        new_state: Start a new state store where one was lost (see :class:`Coordinator`).
        advertise: Overrides ``server.advertise`` (the address standbys name to clients).
        metrics_address: Overrides ``server.metrics_address`` (``HOST:PORT`` of ``/metrics``;
            "" turns it off).
        metrics_allow_remote: Allow a non-loopback ``metrics_address`` (or
            ``server.metrics_allow_remote``).

    Raises:
        ConfigError: The metrics address is malformed, or not a loopback one without
            ``metrics_allow_remote``.
        ConnectError: The metrics address cannot be bound (nothing in the state folder has
            been touched then).
    """
    from flctl.core._memory import return_large_buffers
    from flctl.observe import RunTracker, start_tracking

    return_large_buffers()
    config = load_project(config_path)
    out = Output()
    use_tui = out.is_terminal if tui is None else tui
    setup_logging(logging.WARNING if use_tui else logging.INFO)
    coordinator = Coordinator(
        config,
        address=address,
        insecure=insecure or None,
        new_state=new_state,
        advertise=advertise,
    )
    metrics_at = config.server.metrics_address if metrics_address is None else metrics_address
    metrics: MetricsServer | None = None
    if metrics_at:
        collector = MetricsCollector()
        coordinator.subscribe(collector.observe)
        # bound before the coordinator touches the state folder: a bad address changes nothing
        metrics = MetricsServer(
            collector.registry,
            metrics_at,
            allow_remote=metrics_allow_remote or config.server.metrics_allow_remote,
        )
        log.info("Prometheus metrics at %s", metrics.url)
    tracker: RunTracker | None = None
    ended = "FAILED"
    try:
        # [tracking]: a destination it cannot write stops serve here, before the state is touched
        tracker = start_tracking(config, "serve")
        if tracker is not None:
            coordinator.subscribe(tracker)  # each committed round's metrics
        asyncio.run(_serve(coordinator, out, tui=use_tui, drain_timeout=drain_timeout))
        ended = "FINISHED"
    finally:
        if metrics is not None:
            metrics.close()
        if tracker is not None:  # the head model as the run's artifact; the run ends
            tracker.finish(config, status=ended)
