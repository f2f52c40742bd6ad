"""Rich renderables fed by events: the live dashboard of ``round watch`` and plain log lines.

Fold events into a :class:`DashboardState`, then draw it with :func:`render_dashboard`, or
print :func:`event_line` per event when stdout is not a terminal (the events that
:func:`is_notable` keeps: not every heartbeat).
"""

from flctl.tui._dashboard import render_dashboard
from flctl.tui._line import event_line, is_notable
from flctl.tui._state import ClientView, DashboardState, RoundView

__all__ = [
    "ClientView",
    "DashboardState",
    "RoundView",
    "event_line",
    "is_notable",
    "render_dashboard",
]
