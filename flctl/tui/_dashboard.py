"""The live dashboard: one rich renderable drawn from a :class:`DashboardState`."""

from __future__ import annotations

import time

from rich import box
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flctl.tui._data import format_rate
from flctl.tui._line import format_ago, format_duration, format_metric, plural
from flctl.tui._state import ClientView, DashboardState, RoundView

__all__ = ["render_dashboard"]

#: Rounds shown; older ones collapse into an "N earlier rounds" line.
MAX_ROUNDS = 12
#: Clients shown; the rest collapse into an "N more clients" line.
MAX_CLIENTS = 16
#: Event lines shown in the footer.
FOOTER_LINES = 5
#: Failure reasons listed under the rounds table when there is no room for a Note column.
MAX_NOTES = 3
#: The panel content width from which the rounds table has a Note column (a 100-column
#: terminal): the other columns take up to ~76 and a reason needs ~20 to read well.
NOTE_COLUMN_WIDTH = 96

#: Frames of the in-progress marker; `now` picks one, so a live refresh animates it.
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

_ROUND_STYLES = {
    "committed": "green",
    "rejected": "magenta",
    "failed": "red",
    "cancelled": "yellow",
    "queued": "dim",
}
_CLIENT_STYLES = {
    "idle": "green",
    "downloading": "blue",
    "training": "cyan",
    "uploading": "magenta",
    "offline": "dim red",
}


def render_dashboard(state: DashboardState, *, now: float | None = None) -> RenderableType:
    """Draw the dashboard: header, progress, rounds, clients and the latest events.

    The layout adapts to the width it is given: from about 100 columns the rounds table has a
    Note column (failure reason, committed model version); narrower, failure reasons are
    listed under the table instead.

    Args:
        state: The view-model to draw; it is only read.
        now: Unix time used for elapsed times, deadlines, "last seen" and the spinner;
            defaults to the current time. Tests pass a fixed value.

    Returns:
        A panel, ready for ``Console.print`` or ``rich.live.Live.update``.
    """
    title = Text(state.title, style="bold")
    if state.address:
        title.append(f" · {state.address}", style="not bold")
    body = _Body(state, time.time() if now is None else now)
    return Panel(body, title=title, title_align="left", box=box.ROUNDED)


class _Body:
    """The panel's content, laid out for the width rich offers it."""

    def __init__(self, state: DashboardState, now: float) -> None:
        self.state = state
        self.now = now

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state, now = self.state, self.now
        yield _header(state)
        if state.total_rounds is not None:
            yield _progress(state)
        yield Text()
        yield from _rounds(state, now, has_note=options.max_width >= NOTE_COLUMN_WIDTH)
        yield Text()
        yield from _clients(state, now)
        if state.last_events:
            yield Text()
            yield _footer(state)


def _header(state: DashboardState) -> Text:
    head = "-" if state.head_version is None else f"v{state.head_version}"
    text = Text.assemble(
        ("head model ", "dim"),
        (head, "bold"),
        ("  ·  ", "dim"),
        (str(state.connected_clients), "bold"),
        (" clients connected" if state.connected_clients != 1 else " client connected", "dim"),
    )
    if state.privacy is not None:
        epsilon, budget, accountant = state.privacy
        text.append("  ·  ε ", style="dim")
        text.append(f"{epsilon:.3f}", style="bold")
        text.append(f" of {budget:g} ({accountant})", style="dim")
    if state.state_dir:
        text.append("  ·  state ", style="dim")
        text.append(state.state_dir)
    return text


def _progress(state: DashboardState) -> Table:
    total = state.total_rounds or 0
    done = state.rounds_done
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    bar = ProgressBar(total=max(total, 1), completed=min(done, total))
    grid.add_row(Text(f"rounds {done}/{total}"), bar)
    return grid


def _table(title: str | None) -> Table:
    # Left padding only: with the one-space divider, columns sit two apart, which keeps the
    # rounds table inside 80 columns.
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 0, 0, 1),
    )


def _rounds(state: DashboardState, now: float, *, has_note: bool) -> list[RenderableType]:
    if not state.rounds:
        return [Text("Rounds", style="bold"), Text("no rounds yet", style="dim")]
    views = [state.rounds[key] for key in sorted(state.rounds)]
    hidden = max(0, len(views) - MAX_ROUNDS)
    views = views[hidden:]
    # With rounds hidden, the title moves out of the table so the note sits between them.
    table = _table(None if hidden else "Rounds")
    table.add_column("Round", justify="right", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Clients", justify="right", no_wrap=True)
    table.add_column("Accuracy", justify="right", no_wrap=True)
    table.add_column("Loss", justify="right", no_wrap=True)
    table.add_column("Time")
    if has_note:
        table.add_column("Note")
    for view in views:
        cells = [
            Text(str(view.server_round)),
            _round_status(view, now),
            Text(_round_clients(view)),
            Text(format_metric(view.metrics.get("accuracy"))),
            Text(format_metric(view.metrics.get("loss"))),
            Text(_round_time(view, now)),
        ]
        if has_note:
            cells.append(_round_note(view))
        table.add_row(*cells)
    parts: list[RenderableType] = []
    if hidden:
        parts += [
            Text("Rounds", style="bold"),
            Text(f"… {plural(hidden, 'earlier round')}", style="dim"),
        ]
    parts.append(table)
    if not has_note:
        failed = [view for view in views if view.reason][-MAX_NOTES:]
        parts += [_note_line(view) for view in failed]
    return parts


def _note_line(view: RoundView) -> Text:
    text = f"round {view.server_round}: {view.reason}"
    return Text(text, style="dim", no_wrap=True, overflow="ellipsis")


def _round_status(view: RoundView, now: float) -> Text:
    style = _ROUND_STYLES.get(view.status)
    if style is not None:
        return Text(view.status, style=style)
    frame = _SPINNER[int(now * 10) % len(_SPINNER)]
    return Text(f"{frame} {view.status}", style="cyan")


def _round_clients(view: RoundView) -> str:
    if view.status in ("committed", "rejected"):
        return str(view.num_clients)
    if view.selected:
        return f"{len(view.reported)}/{len(view.selected)}"
    return "-"


def _round_time(view: RoundView, now: float) -> str:
    if view.duration_s is not None:
        return format_duration(view.duration_s)
    if view.is_done or view.started is None:
        return "-"
    text = format_duration(now - view.started)
    if view.deadline is not None:
        left = view.deadline - now
        text += f", deadline in {format_duration(left)}" if left >= 0 else ", deadline passed"
    return text


def _round_note(view: RoundView) -> Text:
    if view.reason:
        return Text(view.reason, style="dim")
    if view.model_version is not None:
        return Text(f"model v{view.model_version}", style="dim")
    return Text()


def _clients(state: DashboardState, now: float) -> list[RenderableType]:
    if not state.clients:
        return [Text("Clients", style="bold"), Text("no clients yet", style="dim")]
    # Connected clients first: they are the ones doing something.
    views = sorted(state.clients.values(), key=lambda c: (not c.connected, c.client_id))
    table = _table("Clients")
    table.add_column("Client", no_wrap=True, overflow="ellipsis")
    table.add_column("State", no_wrap=True)
    table.add_column("Rounds", justify="right", no_wrap=True)
    table.add_column("Last seen", justify="right", no_wrap=True)
    for client in views[:MAX_CLIENTS]:
        table.add_row(
            Text(client.client_id),
            _client_state(client),
            Text(str(client.rounds_joined)),
            Text(format_ago(now - client.last_seen)),
        )
    parts: list[RenderableType] = [table]
    if len(views) > MAX_CLIENTS:
        hidden = len(views) - MAX_CLIENTS
        parts.append(Text(f"… {plural(hidden, 'more client')}", style="dim"))
    return parts


def _client_state(client: ClientView) -> Text:
    text = Text(client.state, style=_CLIENT_STYLES.get(client.state, ""))
    if client.progress is not None and client.state != "idle":
        text.append(f" {client.progress:.0%}")
    if client.bytes_per_s and client.state in ("downloading", "uploading"):
        text.append(f" {format_rate(client.bytes_per_s)}", style="dim")
    return text


def _footer(state: DashboardState) -> Text:
    lines = list(state.last_events)[-FOOTER_LINES:]
    return Text("\n".join(lines), style="dim", no_wrap=True, overflow="ellipsis")
