"""``flctl status``: which coordinator leads, which stand by, their addresses and epochs.

Two sources, both shown: the coordinators' health services (``--server A,B``, or the one this
project's serve.json names), asked over mutual TLS with the admin certificate; and, for a
store on PostgreSQL, the store's own record of who led in each epoch and of every coordinator
that reported itself. Exit 0 when a leader answers, 31 when none does.
"""

from __future__ import annotations

import time
from typing import Any

from flctl.cli._options import ConfigOpt, JsonOpt, ServerOpt
from flctl.cli._output import Output, command

__all__ = ["status_command"]

#: Seconds after which a coordinator that stopped reporting itself counts as gone.
STALE_S = 10.0


def _health_of(config: Any, addresses: list[str], insecure: bool) -> dict[str, str]:
    from flctl.security import load_credentials
    from flctl.transport.grpc import probe_health

    if not addresses:
        return {}
    if insecure:
        return {a: probe_health(a, insecure=True, timeout=2.0) for a in addresses}
    cert, key, ca = load_credentials(config.certs_path, "admin")
    return {
        a: probe_health(a, cert_pem=cert, key_pem=key, ca_pem=ca, timeout=2.0) for a in addresses
    }


def _recorded(config: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The coordinators and epochs a PostgreSQL store records ([], [] for SQLite)."""
    from flctl.store import list_coordinators, list_leaders, open_store

    if not config.store_url:
        return [], []
    store = open_store(config, read_only=True)
    try:
        coordinators, leaders = list_coordinators(store), list_leaders(store)
    finally:
        store.close()
    now = time.time()
    rows = [
        {
            "address": c.address,
            "role": c.role if c.role == "stopped" or now - c.seen <= STALE_S else "gone",
            "epoch": c.epoch,
            "host": c.host,
            "pid": c.pid,
            "seen_s_ago": round(now - c.seen, 1),
        }
        for c in coordinators
    ]
    epochs = [
        {
            "epoch": x.epoch,
            "address": x.address,
            "host": x.host,
            "pid": x.pid,
            "since": x.since,
            "ended": x.ended,
            "end_reason": x.end_reason,
        }
        for x in leaders[-10:]
    ]
    return rows, epochs


@command()
def status_command(
    server: ServerOpt = None, config_path: ConfigOpt = None, json_output: JsonOpt = False
) -> None:
    """Show which coordinator leads, which stand by, with epochs.

    Asks each coordinator's health service (--server A,B, or the one serve.json names) and,
    for a store on PostgreSQL, reads who led in each epoch. Exit 0 when a leader answers.
    """
    from flctl.cli._common import load_project
    from flctl.coordinator import read_serve_file
    from flctl.core.errors import ConnectError
    from flctl.store import store_location
    from flctl.transport.grpc import split_servers

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    running = read_serve_file(config.state_path)
    insecure = False
    if server:
        addresses = list(split_servers(server))
    elif running is not None and running.get("address"):
        addresses = [str(running["address"])]
        insecure = bool(running.get("insecure"))
    else:
        addresses = []
    coordinators, epochs = _recorded(config)
    for row in coordinators:  # the live ones the store knows, asked too
        if row["role"] in ("leader", "standby") and row["address"] not in addresses:
            addresses.append(row["address"])
    health = _health_of(config, addresses, insecure)
    serving = [a for a, state in health.items() if state == "SERVING"]
    current = epochs[-1] if epochs and epochs[-1]["ended"] is None else None
    doc = {
        "store": store_location(config),
        "backend": "postgresql" if config.store_url else "sqlite",
        "leader": serving[0] if serving else None,
        "epoch": None if current is None else current["epoch"],
        "health": health,
        "coordinators": coordinators,
        "epochs": epochs,
    }
    if json_output:
        if serving:  # else one document all the same: the error, with what was found
            out.json(doc)
    else:
        out.line(f"store: {doc['store']}")
        if serving:
            epoch = "" if current is None else f" (epoch {current['epoch']})"
            out.line(f"leader: {serving[0]}{epoch}")
        else:
            out.line("leader: none answers")
        for address, state in health.items():
            words = {"SERVING": "leads", "NOT_SERVING": "stands by (or drains)"}.get(
                state, "unreachable"
            )
            out.line(f"  {address}: {words}")
        for row in coordinators:
            if row["address"] not in health:
                out.line(f"  {row['address']}: {row['role']} (seen {row['seen_s_ago']:g} s ago)")
        if epochs:
            out.line("epochs:")
            for e in epochs:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["since"]))
                end = "leading" if e["ended"] is None else f"ended: {e['end_reason'] or 'stopped'}"
                out.line(f"  {e['epoch']}: {e['address']} since {when} ({end})")
    if not serving:
        among = f" among {', '.join(addresses)}" if addresses else " (none known: pass --server)"
        raise ConnectError(
            "no coordinator leads" + among,
            hint="start `flctl serve`; a standby takes over within seconds of a leader's loss",
            details=doc,
        )
