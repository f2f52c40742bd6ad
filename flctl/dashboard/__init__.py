"""The web dashboard: an ASGI app that is an Admin client of the coordinator, like the CLI.

:func:`run_dashboard` serves it (uvicorn); :func:`create_app` builds the app, which caches
its answers until the next event, from an :class:`AdminSource` (the one Admin connection) and
an :class:`EventHub` (one ``Watch`` stream fanned out to every browser).
"""

from flctl.dashboard._app import create_app
from flctl.dashboard._hub import EventHub
from flctl.dashboard._security import Access
from flctl.dashboard._server import DashboardOptions, is_loopback, run_dashboard
from flctl.dashboard._source import AdminSource, Connect

__all__ = [
    "Access",
    "AdminSource",
    "Connect",
    "DashboardOptions",
    "EventHub",
    "create_app",
    "is_loopback",
    "run_dashboard",
]
