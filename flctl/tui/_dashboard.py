"""The live dashboard: one rich renderable drawn from a :class:`DashboardState`."""

from __future__ import annotations

import time
from dataclasses import dataclass

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
#: Lines the panel's border takes (top and bottom).
BORDER_LINES = 2
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
    "failed": "red",
    "starting": "yellow",
}
#: Client states that are work under way: the panel shows how long they have lasted.
_BUSY_STATES = frozenset({"starting", "downloading", "training", "uploading"})
#: Client states whose progress is bytes moved, reported from the first chunk on.
_TRANSFER_STATES = frozenset({"downloading", "uploading"})


def render_dashboard(state: DashboardState, *, now: float | None = None) -> RenderableType:
    """Draw the dashboard: header, progress, rounds, clients and the latest events.

    The layout adapts to the space it is given. From about 100 columns the rounds table has a
    Note column (failure reason, committed model version); narrower, failure reasons are
    listed under the table instead. The panel never grows taller than the console (the
    terminal, under ``rich.live.Live``): when rounds, clients and events do not all fit, it
    shows the latest rounds, the newest events and as many clients as it can, and says how
    many it left out, instead of letting the terminal cut the bottom off.

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
    """The panel's content, laid out for the width and height rich offers it."""

    def __init__(self, state: DashboardState, now: float) -> None:
        self.state = state
        self.now = now

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state, now = self.state, self.now
        has_note = options.max_width >= NOTE_COLUMN_WIDTH
        # The panel hands down the console's height: the body gets it less the border.
        plan = _plan(state, options.max_height - BORDER_LINES, has_note=has_note)
        yield _header(state)
        if state.total_rounds is not None:
            yield _progress(state)
        yield Text()
        yield from _rounds(state, now, plan)
        yield Text()
        yield from _clients(state, now, plan.clients)
        if plan.events:
            yield Text()
            yield _footer(state, plan.events)


@dataclass
class _Plan:
    """How many rounds, notes, clients and event lines the body shows."""

    rounds: int
    notes: int
    clients: int
    events: int
    has_note: bool


def _plan(state: DashboardState, height: int, *, has_note: bool) -> _Plan:
    """Fit the sections into ``height`` lines, giving up the least useful lines first.

    Every client row is worth more than old rounds and old events, so rounds and events
    shrink first, down to a few each; then clients, to a few; then everything, to one line.
    A height too small even for that gets the minimum (the terminal cuts it, as it would any
    program's output).
    """
    plan = _Plan(
        rounds=min(len(state.rounds), MAX_ROUNDS),
        notes=MAX_NOTES,
        clients=min(len(state.clients), MAX_CLIENTS),
        events=min(len(state.last_events), FOOTER_LINES),
        has_note=has_note,
    )
    stages = [
        ("notes", 1),
        ("events", 3),
        ("rounds", 3),
        ("notes", 0),
        ("events", 2),
        ("clients", 3),
        ("events", 1),
        ("rounds", 1),
        ("clients", 1),
        ("events", 0),
    ]
    for name, floor in stages:
        while _height(state, plan) > height and getattr(plan, name) > floor:
            setattr(plan, name, getattr(plan, name) - 1)
    return plan


def _height(state: DashboardState, plan: _Plan) -> int:
    """Lines the body takes with ``plan``: every renderable in it is one line per row."""
    lines = 1 + (state.total_rounds is not None) + 1  # header, progress, blank
    if state.rounds:
        lines += 2 + plan.rounds + len(_notes(state, plan))  # title, header, rows, notes
    else:
        lines += 2
    lines += 1  # blank
    if state.clients:
        lines += 2 + plan.clients + (plan.clients < len(state.clients))  # title, header
    else:
        lines += 2
    if plan.events:
        lines += 1 + plan.events
    return lines


def _shown_rounds(state: DashboardState, plan: _Plan) -> list[RoundView]:
    views = [state.rounds[key] for key in sorted(state.rounds)]
    return views[len(views) - plan.rounds :] if plan.rounds else []


def _notes(state: DashboardState, plan: _Plan) -> list[RoundView]:
    """The shown rounds whose failure reason is listed under the table (no Note column)."""
    if plan.has_note or not plan.notes:
        return []
    return [view for view in _shown_rounds(state, plan) if view.reason][-plan.notes :]


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
    text.no_wrap, text.overflow = True, "ellipsis"  # one line: the layout counts on it
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
    # No rule under the header: in 24 lines, two more rows are worth more than two rules.
    # Two spaces between columns keep the rounds table inside 80 columns.
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=None,
        header_style="bold",
        pad_edge=False,
        padding=(0, 1),
    )


def _rounds(state: DashboardState, now: float, plan: _Plan) -> list[RenderableType]:
    if not state.rounds:
        return [Text("Rounds", style="bold"), Text("no rounds yet", style="dim")]
    views = _shown_rounds(state, plan)
    hidden = len(state.rounds) - len(views)
    title = Text("Rounds", style="bold", no_wrap=True, overflow="ellipsis")
    if hidden:
        title.append(f"  … {plural(hidden, 'earlier round')}", style="not bold dim")
    table = _table(None)
    # When 80 columns are not enough, the Time column gives way: its deadline is cut short.
    table.add_column("Round", justify="right", no_wrap=True, min_width=5)
    table.add_column("Status", no_wrap=True, min_width=13)
    table.add_column("Clients", justify="right", no_wrap=True, min_width=7)
    table.add_column("Accuracy", justify="right", no_wrap=True, min_width=8)
    table.add_column("Loss", justify="right", no_wrap=True, min_width=7)
    table.add_column("Time", no_wrap=True, overflow="ellipsis")
    if plan.has_note:
        table.add_column("Note")  # the column rich narrows first; its cells stay one line
    for view in views:
        cells = [
            Text(str(view.server_round)),
            _round_status(view, now),
            Text(_round_clients(view)),
            Text(format_metric(view.metrics.get("accuracy"))),
            Text(format_metric(view.metrics.get("loss"))),
            Text(_round_time(view, now)),
        ]
        if plan.has_note:
            cells.append(_round_note(view))
        table.add_row(*cells)
    return [title, table, *(_note_line(view) for view in _notes(state, plan))]


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
        text = view.reason
    elif view.model_version is not None:
        text = f"model v{view.model_version}"
    else:
        text = ""
    outliers = _outliers_note(view)
    if outliers:
        text = f"{text}, {outliers}" if text else outliers
    return Text(text, style="dim", no_wrap=True, overflow="ellipsis")


def _outliers_note(view: RoundView) -> str:
    """``1 excluded, 2 flagged``: the round's updates the outlier rule marked."""
    modes = list(view.outliers.values())
    counts = ((modes.count("drop"), "excluded"), (modes.count("flag"), "flagged"))
    return ", ".join(f"{n} {what}" for n, what in counts if n)


def _clients(state: DashboardState, now: float, shown: int) -> list[RenderableType]:
    if not state.clients:
        return [Text("Clients", style="bold"), Text("no clients yet", style="dim")]
    # Connected clients first: they are the ones doing something.
    views = sorted(state.clients.values(), key=lambda c: (not c.connected, c.client_id))
    table = _table("Clients")
    table.add_column("Client", no_wrap=True, overflow="ellipsis")
    table.add_column("State", no_wrap=True, overflow="ellipsis")
    table.add_column("Rounds", justify="right", no_wrap=True)
    table.add_column("Last seen", justify="right", no_wrap=True)
    for client in views[:shown]:
        table.add_row(
            Text(client.client_id),
            _client_state(client, now),
            Text(str(client.rounds_joined)),
            Text(format_ago(now - client.last_seen)),
        )
    parts: list[RenderableType] = [table]
    hidden = views[shown:]
    if hidden:
        text = f"… {plural(len(hidden), 'more client')}"
        offline = sum(not client.connected for client in hidden)
        if offline:
            text += f" ({offline} not connected)"
        parts.append(Text(text, style="dim", no_wrap=True, overflow="ellipsis"))
    return parts


def _client_state(client: ClientView, now: float) -> Text:
    text = Text(client.state, style=_CLIENT_STYLES.get(client.state, ""))
    moving = client.state in _TRANSFER_STATES
    # A task that reports no progress sits at 0 % all through training: show none then.
    if client.progress is not None and (
        moving or (client.state == "training" and client.progress > 0)
    ):
        text.append(f" {client.progress:.0%}")
    if client.bytes_per_s and moving:
        text.append(f" {format_rate(client.bytes_per_s)}", style="dim")
    if client.state in _BUSY_STATES and client.state_since is not None:
        text.append(f" {format_duration(now - client.state_since)}", style="dim")
    return text


def _footer(state: DashboardState, count: int) -> Text:
    lines = list(state.last_events)[-count:]
    return Text("\n".join(lines), style="dim", no_wrap=True, overflow="ellipsis")
