"""``flctl events``: the persisted event log, filtered; ``--type admin`` is the audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flctl.cli._output import Output
from flctl.core.events import ADMIN_EVENT_TYPES

__all__ = ["ADMIN_EVENT_TYPES", "list_events"]


def _actor(event: Any) -> str:
    data = event.data or {}
    return str(data.get("admin") or data.get("author") or "")


def list_events(
    *,
    type_filter: str | None,
    since: int,
    limit: int,
    config_path: Path | None,
    json_output: bool,
) -> None:
    """List the event log from the state store (with or without a running coordinator)."""
    from flctl.cli._common import load_project
    from flctl.core.errors import InvalidInputError
    from flctl.store import open_store
    from flctl.tui import event_line

    if limit < 1:
        raise InvalidInputError(f"--limit must be at least 1, not {limit}")
    config = load_project(config_path)
    store = open_store(config, read_only=True)
    try:
        # the newest --limit events of the type after --since, page by page from the newest:
        # never the whole log
        chosen: list[Any] = []
        before = 0
        while len(chosen) < limit:
            want = min(1000, limit - len(chosen))
            page = store.events_page(before, want, type_filter or "")
            newer = [e for e in page if e.seq > since]
            chosen.extend(newer)
            if len(page) < want or len(newer) < len(page):
                break
            before = page[-1].seq
        chosen.reverse()
    finally:
        store.close()
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "events": [
                    {
                        "seq": e.seq,
                        "time": e.time,
                        "type": e.type,
                        "round": e.server_round,
                        "client_id": e.client_id,
                        "actor": _actor(e) or None,
                        "data": e.data,
                    }
                    for e in chosen
                ]
            }
        )
        return
    for event in chosen:
        actor = _actor(event)
        out.line(f"{event.seq}\t{event_line(event)}" + (f"\tby {actor}" if actor else ""))
    if not chosen:
        out.note(f"no events{' of type ' + type_filter if type_filter else ''} after seq {since}")
