"""``flctl round status`` and ``flctl clients ls``: what the coordinator is doing, and who."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from flctl.cli._options import ConfigOpt, JsonOpt, ServerOpt
from flctl.cli._output import Output, command

__all__ = ["MIB", "RoundIdsOpt", "clients_app", "clients_ls", "round_cancel", "round_status"]

MIB = 1 << 20

clients_app = typer.Typer(help="The clients a coordinator knows.", no_args_is_help=True)


def round_status(
    *, server: str | None, config_path: Any, round_ids: list[int], json_output: bool
) -> dict[str, Any]:
    """Print rounds (all, or ``round_ids``), the head version and connected clients."""
    from flctl.cli._common import call_admin, load_project, round_dict

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    reply = call_admin(config, server, lambda client: client.status(round_ids))
    document: dict[str, Any] = {
        "rounds": [round_dict(r) for r in reply.rounds],
        "head": int(reply.head_version) or None,
        "connected_clients": int(reply.connected_clients),
        "state_dir": reply.state_dir,
    }
    if json_output:
        out.json(document)
        return document
    if out.is_terminal:
        table = Table(
            title=f"rounds (head model v{document['head']}, "
            f"{document['connected_clients']} clients connected)",
            title_justify="left",
        )
        for column in ("round", "status", "clients", "accuracy", "loss", "time", "reason"):
            table.add_column(column)
        for row in document["rounds"]:
            m = row["metrics"]
            table.add_row(
                str(row["round"]),
                row["status"],
                str(row["num_clients"]),
                f"{m['accuracy']:.4f}" if "accuracy" in m else "-",
                f"{m['loss']:.4f}" if "loss" in m else "-",
                f"{row['duration_s']:.1f} s",
                row.get("reason", ""),
            )
        out.console.print(table)
    else:
        for row in document["rounds"]:
            reason = f"\t{row['reason']}" if row.get("reason") else ""
            out.line(
                f"{row['round']}\t{row['status']}\t{row['num_clients']}\t{row['duration_s']:.1f}s{reason}"
            )
        out.line(f"head {document['head']}; {document['connected_clients']} clients connected")
    return document


def round_cancel(
    *,
    server: str | None,
    config_path: Any,
    round_ids: list[int],
    queued: bool,
    reason: str,
    json_output: bool,
) -> dict[str, Any]:
    """Cancel rounds through the running coordinator; print what was cancelled."""
    from flctl.cli._common import call_admin, load_project

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    reply = call_admin(
        config,
        server,
        lambda client: client.cancel_round(round_ids, queued=queued, reason=reason),
    )
    document = {"cancelled": [int(r) for r in reply.cancelled], "message": reply.message}
    if json_output:
        out.json(document)
    else:
        out.line(reply.message)
    return document


def _client_rows(config: Any, server: str | None) -> tuple[list[dict[str, Any]], bool]:
    """Clients from the running coordinator (live states), else from the store (offline)."""
    from flctl.cli._common import call_admin
    from flctl.coordinator import read_serve_file

    if server or read_serve_file(config.state_path):
        reply = call_admin(config, server, lambda client: client.list_clients())
        return [
            {
                "client_id": c.client_id,
                "state": c.state,
                "last_seen": c.last_seen_unix,
                "rounds_joined": int(c.rounds_joined),
                "bytes_up": int(c.bytes_up),
                "bytes_down": int(c.bytes_down),
            }
            for c in reply.clients
        ], True
    from flctl.core.errors import NotFoundError
    from flctl.store import SqlStore

    if not (config.state_path / "state.db").is_file():
        raise NotFoundError(f"no state store in {config.state_path}")
    store = SqlStore.open(config.state_path)
    try:
        records = store.list_clients()
    finally:
        store.close()
    return [
        {
            "client_id": c.client_id,
            "state": "offline",
            "last_seen": c.last_seen,
            "rounds_joined": c.rounds_joined,
            "bytes_up": c.bytes_up,
            "bytes_down": c.bytes_down,
        }
        for c in records
    ], False


@clients_app.command("ls")
@command()
def clients_ls(
    server: ServerOpt = None, config_path: ConfigOpt = None, json_output: JsonOpt = False
) -> None:
    """List clients: state, last seen, rounds joined, bytes moved."""
    from flctl.cli._common import load_project

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    rows, live = _client_rows(config, server)
    if json_output:
        out.json({"clients": rows, "live": live})
        return
    now = time.time()
    for row in rows:
        ago = f"{now - row['last_seen']:.0f}s ago" if row["last_seen"] else "never"
        out.line(
            f"{row['client_id']}\t{row['state']}\tlast seen {ago}\trounds {row['rounds_joined']}\t"
            f"up {row['bytes_up'] / MIB:.1f} MiB\tdown {row['bytes_down'] / MIB:.1f} MiB"
        )
    if not live:
        out.note("no coordinator running: states are from the store")


RoundIdsOpt = Annotated[
    list[int] | None, typer.Option("--round", help="Only this round (repeatable).")
]
