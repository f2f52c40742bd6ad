"""``flctl round status`` and ``flctl clients ls``: what the coordinator is doing, and who."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from flctl.cli._options import ConfigOpt, JsonOpt, ServerOpt
from flctl.cli._output import Output, command

__all__ = [
    "MIB",
    "RoundIdsOpt",
    "clients_app",
    "clients_evict",
    "clients_ls",
    "round_cancel",
    "round_status",
]

MIB = 1 << 20

clients_app = typer.Typer(help="The clients a coordinator knows.", no_args_is_help=True)


def round_status(
    *, server: str | None, config_path: Any, round_ids: list[int], json_output: bool
) -> dict[str, Any]:
    """Print rounds (all, or ``round_ids``), the head version, connected clients and updates.

    The updates (anomaly scores, outlier marks) are those the coordinator's reply lists: of
    each round asked for (the newest 16), or of the newest round that left the queue.
    """
    from flctl.cli._common import call_admin, load_project, round_dict
    from flctl.cli._scores import update_doc

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    reply = call_admin(config, server, lambda client: client.status(round_ids))
    document: dict[str, Any] = {
        "rounds": [round_dict(r) for r in reply.rounds],
        "head": int(reply.head_version) or None,
        "connected_clients": int(reply.connected_clients),
        "state_dir": reply.state_dir,
        "open_round": _open_round(reply),
        "warnings": list(reply.warnings),
    }
    for row, info in zip(document["rounds"], reply.rounds, strict=True):
        if info.updates_listed:
            row["updates"] = [update_doc(u) for u in info.updates]
            if info.updates_left_out:
                row["updates_left_out"] = int(info.updates_left_out)
        if info.HasField("secagg"):
            row["secagg"] = _secagg_doc(info.secagg)
    if json_output:
        out.json(document)
        return document
    rows = []
    for row in document["rounds"]:
        m = row["metrics"]
        rows.append(
            [
                str(row["round"]),
                row["status"],
                str(row["num_clients"]),
                f"{m['accuracy']:.4f}" if "accuracy" in m else "-",
                f"{m['loss']:.4f}" if "loss" in m else "-",
                f"{row['duration_s']:.1f} s",
                row.get("reason") or "-",
            ]
        )
    out.table(
        ["round", "status", "clients", "accuracy", "loss", "time", "reason"],
        rows,
        title=f"rounds (head model v{document['head'] or '-'}, "
        f"{document['connected_clients']} clients connected)",
        right=["round", "clients", "accuracy", "loss", "time"],
    )
    # Piped, stdout holds only the table; the open round's story is for the reader.
    for line in _explain(document["open_round"]):
        (out.line if out.is_terminal else out.note)(line)
    for row in document["rounds"]:
        for line in _secagg_lines(row):
            (out.line if out.is_terminal else out.note)(line)
    if out.is_terminal:
        _print_updates(out, document["rounds"], is_asked=bool(round_ids))
    for warning in document["warnings"]:
        out.note(f"warning: {warning}")
    return document


def _secagg_doc(info: Any) -> dict[str, Any]:
    """A round's secure aggregation (``RoundInfo.secagg``) as JSON."""
    return {
        "stage": info.stage or None,
        "participants": int(info.participants),
        "threshold": int(info.threshold),
        "dropped": dict(sorted(info.dropped.items())),
        "outcome": info.outcome or None,
        "reason": info.reason or None,
        "survivors": int(info.survivors) if info.outcome == "unmasked" else None,
        "error_bound": info.error_bound if info.outcome == "unmasked" else None,
    }


def _secagg_lines(row: dict[str, Any]) -> list[str]:
    """A round's secure aggregation in words: its stage or outcome, and who dropped where."""
    doc = row.get("secagg")
    if doc is None:
        return []
    if doc["outcome"] == "unmasked":
        what = (
            f"unmasked the sum of {doc['survivors']} of {doc['participants']} clients "
            f"(threshold {doc['threshold']}, error bound {doc['error_bound']:.2g})"
        )
    elif doc["outcome"] == "failed":
        what = f"failed: {doc['reason']}"
    else:
        what = f"{doc['participants']} clients, threshold {doc['threshold']}; " + (
            f"{doc['stage']} done" if doc["stage"] else "exchanging keys"
        )
    lines = [f"round {row['round']}: secure aggregation {what}"]
    lines += [f"  {client_id}: {why}" for client_id, why in doc["dropped"].items()]
    return lines


def _print_updates(out: Output, rounds: list[dict[str, Any]], *, is_asked: bool) -> None:
    """A table per listed round whose updates were scored: scores and outliers.

    Says which updates the reply left out: the newest of a round past the reply's size
    budget, and those of asked rounds beyond the ones it lists.
    """
    from flctl.cli._scores import UPDATE_COLUMNS, UPDATE_NUMBERS, update_rows

    for row in rounds:
        docs = row.get("updates", [])
        if any(doc["scores"] is not None for doc in docs):
            excluded = sum(doc["excluded"] for doc in docs)
            flagged = sum(bool(doc["outlier"]) for doc in docs) - excluded
            counts = ((excluded, "excluded"), (flagged, "flagged"))
            marks = [f"{n} {what}" for n, what in counts if n]
            out.table(
                UPDATE_COLUMNS,
                update_rows(docs),
                title=f"updates of round {row['round']}"
                + (f" ({', '.join(marks)})" if marks else ""),
                right=UPDATE_NUMBERS,
            )
        if row.get("updates_left_out"):
            out.note(
                f"round {row['round']}: {row['updates_left_out']} more updates did not fit in "
                "the reply (its size is bounded: `--round N` alone lists the most)"
            )
    unlisted = [str(row["round"]) for row in rounds if "updates" not in row]
    if is_asked and unlisted:
        out.note(
            f"round{'s' if len(unlisted) > 1 else ''} {', '.join(unlisted)}: updates not "
            "listed (a reply lists those of the newest rounds asked only)"
        )


def _open_round(reply: Any) -> dict[str, Any] | None:
    """The StatusReply's open round as JSON (None when no round is in training)."""
    if not reply.HasField("open_round"):
        return None
    o = reply.open_round
    return {
        "round": int(o.server_round),
        "deadline_unix": o.deadline_unix,
        "seconds_left": max(0.0, round(o.deadline_unix - time.time(), 1)),
        "min_clients": int(o.min_clients),
        "at_deadline": o.at_deadline,
        "participants": [
            {
                "client_id": p.client_id,
                "state": p.state,
                "progress": round(p.progress, 3),
                "bytes_per_s": round(p.bytes_per_s, 1),
            }
            for p in o.participants
        ],
    }


def _explain(open_round: dict[str, Any] | None) -> list[str]:
    """Why the open round is where it is: who reported, who is busy, who is gone, what next."""
    from flctl.tui._data import format_rate

    if open_round is None:
        return []
    lines = [
        f"round {open_round['round']} in training: deadline in "
        f"{open_round['seconds_left']:.0f} s; at the deadline: {open_round['at_deadline']}"
    ]
    for p in open_round["participants"]:
        detail = p["state"]
        if p["state"] in ("downloading", "uploading", "training") and p["progress"]:
            detail += f" {p['progress']:.0%}"
        if p["bytes_per_s"]:
            detail += f" {format_rate(p['bytes_per_s'])}"
        lines.append(f"  {p['client_id']}: {detail}")
    return lines


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
    from flctl.store import open_store

    store = open_store(config, read_only=True)
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
    out.table(
        ["client", "state", "last seen", "rounds", "up", "down"],
        [
            [
                row["client_id"],
                row["state"],
                f"{now - row['last_seen']:.0f} s ago" if row["last_seen"] else "never",
                str(row["rounds_joined"]),
                f"{row['bytes_up'] / MIB:.1f} MiB",
                f"{row['bytes_down'] / MIB:.1f} MiB",
            ]
            for row in rows
        ],
        title="clients" if live else "clients (no coordinator running: states are from the store)",
        right=["last seen", "rounds", "up", "down"],
    )


RoundIdsOpt = Annotated[
    list[int] | None, typer.Option("--round", help="Only this round (repeatable).")
]


@clients_app.command("evict")
@command()
def clients_evict(
    client_id: Annotated[str, typer.Argument(help="The client whose session to end.")],
    reason: Annotated[str, typer.Option(help="Why, recorded with the eviction.")] = "",
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """End a client's session.

    It may join again: `flctl certs revoke` keeps it out.
    """
    from flctl.cli._common import call_admin, load_project

    config = load_project(config_path)
    out = Output(json_mode=json_output)
    reply = call_admin(config, server, lambda client: client.evict(client_id, reason=reason))
    if json_output:
        out.json({"client_id": client_id, "evicted": reply.evicted, "message": reply.message})
    else:
        out.line(reply.message)
