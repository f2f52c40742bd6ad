"""``flctl round start`` and ``flctl round watch``: operating a running coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from rich.live import Live

from flctl.cli._common import admin_client, retry_connect, round_dict
from flctl.cli._output import Output
from flctl.coordinator import running_serve_file
from flctl.core import Config, Event
from flctl.core.errors import (
    BudgetExhaustedError,
    ConnectError,
    FlctlError,
    InvalidInputError,
    RoundCancelledError,
    RoundFailedError,
    RoundRejectedError,
)
from flctl.core.events import TERMINAL_ROUND_STATUSES
from flctl.store import open_store, require_state
from flctl.transport.grpc import AdminClient, pb
from flctl.tui import DashboardState, event_line, render_dashboard

__all__ = ["event_from_pb", "rounds_exit_code", "start_rounds", "wait_rounds", "watch_events"]


def event_from_pb(message: pb.Event) -> Event:
    """A wire Event as the core dataclass the panels fold."""
    try:
        data = json.loads(message.data_json) if message.data_json else {}
    except ValueError:
        data = {}
    return Event(
        seq=int(message.seq),
        time=message.time_unix,
        type=message.type,
        server_round=int(message.server_round),
        client_id=message.client_id,
        data=data if isinstance(data, dict) else {},
    )


async def wait_rounds(
    make_client: Callable[[], AdminClient],
    round_ids: list[int],
    *,
    reconnect_timeout: float,
    on_progress: Callable[[list[pb.RoundInfo]], None] | None = None,
    on_retry: Callable[[str], None] = lambda message: None,
    poll_s: float = 0.5,
) -> tuple[list[pb.RoundInfo], int]:
    """Poll until every round in ``round_ids`` is terminal; return them and the head version.

    A coordinator that goes away is waited for up to ``reconnect_timeout`` seconds.
    """
    client = make_client()

    async def status() -> pb.StatusReply:
        nonlocal client
        try:
            return await client.status(round_ids, timeout=10.0)
        except ConnectError:
            await client.close()
            client = make_client()
            raise

    try:
        while True:
            reply = await retry_connect(status, timeout=reconnect_timeout, on_retry=on_retry)
            rounds = list(reply.rounds)
            if on_progress is not None:
                on_progress(rounds)
            if rounds and all(r.status in TERMINAL_ROUND_STATUSES for r in rounds):
                return rounds, int(reply.head_version)
            await asyncio.sleep(poll_s)
    finally:
        await client.close()


def _progress_printer(out: Output) -> Callable[[list[pb.RoundInfo]], None]:
    seen: dict[int, str] = {}

    def show(rounds: list[pb.RoundInfo]) -> None:
        for info in rounds:
            if seen.get(info.server_round) == info.status:
                continue
            seen[info.server_round] = info.status
            row = round_dict(info)
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(row["metrics"].items()))
            extra = f" ({metrics})" if metrics else ""
            reason = f": {info.reason}" if info.reason else ""
            out.note(f"round {info.server_round}: {info.status}{reason}{extra}")

    return show


def start_rounds(
    config: Config,
    *,
    rounds: int,
    wait: bool,
    json_output: bool,
    server: str | None,
    reconnect_timeout: float,
) -> dict[str, Any]:
    """Queue rounds; with ``wait``, block until they end; print and return the results."""
    out = Output(json_mode=json_output)
    if rounds < 1:
        raise InvalidInputError(f"--rounds must be at least 1, not {rounds}")

    async def main() -> dict[str, Any]:
        client = admin_client(config, server)
        try:
            reply = await client.start_round(rounds)
        finally:
            await client.close()
        ids = [int(i) for i in reply.round_ids]
        if not wait:
            return {"round_ids": ids}
        out.note(f"queued rounds {ids[0]}..{ids[-1]}; waiting for them to end")
        infos, head = await wait_rounds(
            lambda: admin_client(config, server),
            ids,
            reconnect_timeout=reconnect_timeout,
            on_progress=_progress_printer(out),
            on_retry=lambda message: out.note(f"coordinator unreachable, retrying: {message}"),
        )
        return {"rounds": [round_dict(i) for i in infos], "model_version": head}

    result = asyncio.run(main())
    if json_output:
        out.json(result)
    elif "round_ids" in result:
        ids = result["round_ids"]
        out.line(f"queued round{'s' if len(ids) > 1 else ''} {', '.join(str(i) for i in ids)}")
    else:
        for row in result["rounds"]:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(row["metrics"].items()))
            out.line(
                f"round {row['round']}: {row['status']} with {row['num_clients']} clients "
                f"in {row['duration_s']:.1f} s{'; ' + metrics if metrics else ''}"
                f"{'; ' + row['reason'] if row.get('reason') else ''}"
            )
        out.line(f"head model version: {result['model_version']}")
    return result


def rounds_exit_code(rounds: list[dict[str, Any]]) -> int:
    """0 when every round committed; a failure's, cancellation's or rejection's code otherwise.

    Failed rounds that the coordinator all refused for the privacy budget give
    BudgetExhaustedError's code; any other failure gives RoundFailedError's. Without failures,
    a cancelled round gives RoundCancelledError's code, then a round whose model the
    validation gate rejected (stored, but not the head) RoundRejectedError's.
    """
    statuses = {row["status"] for row in rounds}
    if "failed" in statuses:
        failed = [row for row in rounds if row["status"] == "failed"]
        if all(
            str(row.get("reason", "")).startswith(BudgetExhaustedError.reason_prefix)
            for row in failed
        ):
            return BudgetExhaustedError.exit_code
        return RoundFailedError.exit_code
    if statuses - {"committed", "rejected"}:
        return RoundCancelledError.exit_code
    if "rejected" in statuses:
        return RoundRejectedError.exit_code
    return 0


#: How long ``round watch --follow --server A,B`` waits for a new leader after losing one.
TAKEOVER_WAIT_S = 120.0


async def _connected(config: Config, server: str | None) -> AdminClient:
    """An Admin connection to the leader among ``server``'s addresses (ConnectError: none)."""
    return admin_client(config, server)


def watch_events(
    config: Config, *, server: str | None, follow: bool | None, json_output: bool, since: int
) -> None:
    """Show the live panel of a running coordinator (plain event lines when piped).

    Args:
        config: The project.
        server: The coordinator's HOST:PORT (default: from its serve.json).
        follow: Keep following new events until Ctrl-C; None: on a terminal only, so that a
            pipe or a script gets the events so far and an end.
        json_output: Print the events so far as one JSON document (never follows).
        since: Replay the events after this seq.
    """
    out = Output(json_mode=json_output)
    # no coordinator runs (it stopped, or the run was `flctl simulate`): the recorded log
    offline = server is None and running_serve_file(config.state_path) is None
    if offline:
        try:
            require_state(config)
        except FlctlError:  # no store either: say no coordinator runs, as before
            offline = False
    if offline and follow:
        out.note("no coordinator runs here: showing the recorded events")
    if offline or json_output:
        follow = False
    elif follow is None:
        follow = out.is_terminal
    leave = "Ctrl-C to leave"
    state = DashboardState(title=f"flctl round watch ({leave})" if follow else "flctl round watch")
    collected: list[dict[str, Any]] = []

    async def recorded() -> AsyncIterator[Event]:
        """The events the state store holds (read-only)."""
        store = open_store(config, read_only=True)
        try:
            seq = since
            while batch := store.events_since(seq, limit=5000):
                for event in batch:
                    yield event
                seq = batch[-1].seq
        finally:
            store.close()

    several = bool(server and "," in server)

    async def watched(client: AdminClient) -> AsyncIterator[Event]:
        """The running coordinator's events (and, following, those to come).

        Following several coordinators (``--server A,B``), a leader that goes away is not the
        end: the stream resumes after the last event seen, from whichever coordinator leads
        next (waited for up to :data:`TAKEOVER_WAIT_S`).
        """
        seq = since
        while True:
            try:
                async for message in client.watch(seq, follow=follow):
                    event = event_from_pb(message)
                    seq = event.seq
                    yield event
                if not (follow and several):
                    return
                reason = "the coordinator ended the stream"
            except ConnectError as exc:
                if not (follow and several):
                    raise
                reason = exc.message
            await client.close()
            out.note(f"{reason}: following the next leader of {server}")

            client = await retry_connect(
                lambda: _connected(config, server),
                timeout=TAKEOVER_WAIT_S,
                on_retry=lambda message: None,  # the note above said what happens
            )
            clients[0] = client

    clients: list[AdminClient | None] = [None]

    async def main() -> None:
        client = None if offline else admin_client(config, server)
        clients[0] = client
        stream = recorded() if client is None else watched(client)
        live: Live | None = None
        if out.is_terminal and follow:
            live = Live(
                get_renderable=lambda: render_dashboard(state, now=time.time()),
                console=out.console,
                refresh_per_second=4,
            )
            live.start()
        elif follow:
            out.note(f"following the coordinator's events; {leave}")
        try:
            async for event in stream:
                state.apply(event)
                if json_output:
                    collected.append(
                        {
                            "seq": event.seq,
                            "time": event.time,
                            "type": event.type,
                            "round": event.server_round,
                            "client_id": event.client_id,
                            "data": event.data,
                        }
                    )
                elif live is None:
                    out.line(event_line(event))
        finally:
            if live is not None:
                live.stop()
            if clients[0] is not None:
                await clients[0].close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    if json_output:
        out.json({"events": collected})
    elif not follow and out.is_terminal:
        out.console.print(render_dashboard(state, now=time.time()))
