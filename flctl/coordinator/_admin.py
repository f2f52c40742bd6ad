"""The handlers behind the Admin service: reads, rounds, and changes made while it runs.

Every inbound field is checked before it touches state; a refusal raises a flctl error, which
the transport turns into a gRPC status with the message. Every call is refused first for a
revoked identity or certificate, or one out of its validity window (:class:`RevocationGuard`).
Changes to the coordinator's state (start rounds, revoke, rollback, tag, evict, cancel) are
recorded with the calling admin's identity; a rollback is serialised with rounds by the
:class:`RoundEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from flctl.core import events as ev
from flctl.core.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
)
from flctl.core.events import Event
from flctl.store import (
    BlobStore,
    ModelRecord,
    SqlStore,
    is_revoked,
    revoke,
)
from flctl.transport.grpc import (
    MESSAGE_OVERHEAD,
    RpcContext,
    model_info,
    pb,
    round_info,
    update_info,
)

from ._engine import PendingRollback, RoundEngine, end_round
from ._events import EventLog
from ._guard import RevocationGuard
from ._limits import MAX_ID, bounded, check_id
from ._registry import Registry

__all__ = ["AdminService"]

log = logging.getLogger("flctl.coordinator")

_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")
#: Bounds of the Admin service's text fields (refs, reasons).
_MAX_REF = 256
_MAX_REASON = 1024
#: A Status reply lists the updates of at most this many rounds (the newest of those asked).
STATUS_UPDATE_ROUNDS = 16
#: The most rounds one paged ``Status`` (``limit``) lists.
MAX_LISTED_ROUNDS = 1000
#: The most events one ``ListEvents`` page holds.
MAX_LISTED_EVENTS = 500
#: The most bytes the updates take in one Status reply (about 700 updates of usual size).
STATUS_UPDATES_BYTES = 64 * 1024
#: Room a Status reply keeps below the message limit however many rounds it lists.
_STATUS_REPLY_SLACK = 4096
#: What listing one more round may add to a reply around its updates: ``updates_listed``,
#: ``updates_left_out`` and the longer length prefix of its RoundInfo.
_LISTED_ROUND_BYTES = 12


def _event_message(event: Event) -> pb.Event:
    return pb.Event(
        seq=event.seq,
        time_unix=event.time,
        type=event.type,
        server_round=event.server_round,
        client_id=event.client_id,
        data_json=json.dumps(event.data),
    )


#: The events that tell a round's secure aggregation (``RoundInfo.secagg``).
_SECAGG_EVENTS = frozenset(
    {ev.SEC_AGG_STARTED, ev.SEC_AGG_STAGE_CLOSED, ev.SEC_AGG_UNMASKED, ev.SEC_AGG_FAILED}
)


def _secagg_info(events: list[Event]) -> pb.SecAggInfo:
    """A round's secure aggregation from its ``secagg.*`` events (oldest first)."""
    info = pb.SecAggInfo()
    for event in events:
        data = event.data
        if event.type == ev.SEC_AGG_STARTED:
            info.participants = len(data.get("participants", []))
            info.threshold = int(data.get("threshold", 0))
        elif event.type == ev.SEC_AGG_STAGE_CLOSED:
            info.stage = str(data.get("stage", ""))
            for client_id, why in dict(data.get("dropped", {})).items():
                info.dropped[client_id] = str(why)
        elif event.type in (ev.SEC_AGG_UNMASKED, ev.SEC_AGG_FAILED):
            if event.type == ev.SEC_AGG_UNMASKED:
                info.outcome = "unmasked"
                info.stage = "unmask"
                info.survivors = len(data.get("survivors", []))
                info.error_bound = float(data.get("error_bound", 0.0))
            else:
                info.outcome = "failed"
                info.reason = str(data.get("reason", ""))
            for client_id, stage in dict(data.get("dropouts", {})).items():
                if client_id not in info.dropped:
                    info.dropped[client_id] = f"dropped at {stage}"
    return info


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _parse_serial(text: str) -> int | None:
    """A RevokeRequest's serial: "" for every certificate, else lower-case hex."""
    if not text:
        return None
    if _SERIAL_RE.fullmatch(text) is None or int(text, 16) == 0:
        raise InvalidInputError(
            f"serial must be a certificate serial in lower-case hex, not {text[:48]!r}"
        )
    return int(text, 16)


def _ref(text: str) -> str:
    """A model ref from the wire: bounded, and a version number within range."""
    ref = bounded("ref", text, _MAX_REF)
    if ref.isascii() and ref.isdigit() and int(ref) > MAX_ID:
        raise NotFoundError(f"no model version {ref[:24]}")
    return ref


class AdminService:
    """Implements the Admin service: reads, rounds, and changes made while the coordinator runs.

    Reads: status, clients, models, the event stream. Changes (start rounds, revoke, rollback,
    tag) are recorded with the calling admin's identity.

    Args:
        max_chunk_bytes: The coordinator's ``[transport] max_chunk_bytes``: with
            ``MESSAGE_OVERHEAD`` it bounds every message, and a Status reply stays under it.
    """

    MAX_ROUNDS_PER_START = 10_000

    def __init__(
        self,
        *,
        store: SqlStore,
        blobs: BlobStore,
        events: EventLog,
        registry: Registry,
        engine: RoundEngine,
        guard: RevocationGuard,
        state_dir: str,
        config_snapshot: dict[str, Any],
        max_chunk_bytes: int = 1 << 20,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._registry = registry
        self._engine = engine
        self._guard = guard
        self._state_dir = state_dir
        self._config_snapshot = config_snapshot
        self._max_message_bytes = max_chunk_bytes + MESSAGE_OVERHEAD

    async def start_round(
        self, request: pb.StartRoundRequest, ctx: RpcContext
    ) -> pb.StartRoundReply:
        """Queue rounds; they run after any already queued or open."""
        self._guard.admit(ctx, "StartRound")
        if not 1 <= request.rounds <= self.MAX_ROUNDS_PER_START:
            raise InvalidInputError(
                f"rounds must be between 1 and {self.MAX_ROUNDS_PER_START}, not {request.rounds}"
            )
        ids = self._store.create_rounds(request.rounds, self._config_snapshot)
        for server_round in ids:
            self._events.emit(ev.RoundQueued(admin=ctx.identity), server_round=server_round)
        self._engine.notify()
        return pb.StartRoundReply(round_ids=ids)

    async def status(self, request: pb.StatusRequest, ctx: RpcContext) -> pb.StatusReply:
        """Rounds (all, or those asked for), head version, connected clients, updates.

        The updates (with their anomaly scores) are listed for the rounds asked for, the newest
        :data:`STATUS_UPDATE_ROUNDS` of them, or without ``round_ids`` for the newest round
        that left the queue (:meth:`_list_updates` keeps the reply bounded).
        """
        self._guard.admit(ctx, "Status")
        ids = [check_id("round id", i) for i in request.round_ids] or None
        before = check_id("before_round", request.before_round)
        limit = min(int(request.limit), MAX_LISTED_ROUNDS) if request.limit else None
        rounds = self._store.list_rounds(ids, limit=limit if ids is None else None, before=before)
        head = self._store.head()
        reply = pb.StatusReply(
            rounds=[round_info(r) for r in rounds],
            rounds_total=self._store.count_rounds(),
            head_version=head.version if head else 0,
            connected_clients=len(self._registry.connected()),
            state_dir=self._state_dir,
            open_round=self._open_round(),
            warnings=[self._engine.storage_warning[1]] if self._engine.storage_warning else [],
        )
        if (ids is not None or limit is not None) and not request.without_phases:
            marks = self._store.round_events(
                [int(r.server_round) for r in reply.rounds], ev.PHASE_EVENT_TYPES
            )
            for info in reply.rounds:
                for phase, seconds in ev.round_phases(marks.get(int(info.server_round), [])):
                    info.phases.add(phase=phase, seconds=round(seconds, 3))
        if ids is not None:
            listed = list(reply.rounds)[-STATUS_UPDATE_ROUNDS:]
        else:
            listed = [r for r in reply.rounds if r.status != "queued"][-1:]
        self._list_updates(reply, listed[::-1])
        secure = self._store.round_events([int(r.server_round) for r in listed], _SECAGG_EVENTS)
        for info in listed:
            found = secure.get(int(info.server_round))
            if found:
                info.secagg.CopyFrom(_secagg_info(found))
        return reply

    def _list_updates(self, reply: pb.StatusReply, rounds: list[pb.RoundInfo]) -> None:
        """Fill ``rounds``' updates (each in arrival order, newest round first) within a budget.

        The updates take at most :data:`STATUS_UPDATES_BYTES` and never bring the reply past
        the message limit (less :data:`_STATUS_REPLY_SLACK`); those that do not fit are counted in
        ``updates_left_out``. A round has one accepted update per selected client, but its
        rejected ones (late, duplicate, wrong round) have no such bound, hence bytes, not counts.
        """
        limit = self._max_message_bytes - _STATUS_REPLY_SLACK
        room = min(STATUS_UPDATES_BYTES, limit - reply.ByteSize())
        for info in rounds:
            room -= _LISTED_ROUND_BYTES
            info.updates_listed = True
            records = self._store.updates_for_round(int(info.server_round))
            for position, record in enumerate(records):
                update = update_info(record)
                size = update.ByteSize()
                size += 1 + _varint_size(size)
                if size > room:
                    info.updates_left_out = len(records) - position
                    room = 0  # the older rounds' updates are left out too, not cherry-picked
                    break
                info.updates.append(update)
                room -= size

    def _open_round(self) -> pb.OpenRound | None:
        """Where each selected client of the round in training stands, and what comes next."""
        open_round = self._engine.open
        if open_round is None:
            return None
        server_round = open_round.server_round
        reported = {
            u.client_id for u in self._store.updates_for_round(server_round, status="accepted")
        }
        participants = []
        for client_id in sorted(open_round.selected):
            session = self._registry.get(client_id)
            if client_id in reported:
                state, progress, rate = "reported", 1.0, 0.0
            elif session is None or not session.streaming:
                state, progress, rate = "offline", 0.0, 0.0
            elif session.failed_round == server_round:
                state, progress, rate = "failed", 0.0, 0.0
            else:
                state, progress, rate = session.state, session.progress, session.bytes_per_s
            participants.append(
                pb.Participant(
                    client_id=client_id, state=state, progress=progress, bytes_per_s=rate
                )
            )
        need = self._engine.min_clients
        have = len(reported)
        at_deadline = (
            f"commit with the {have} updates received"
            if have >= need
            else f"fail: {have} of the {need} required updates so far"
        )
        return pb.OpenRound(
            server_round=server_round,
            deadline_unix=open_round.deadline,
            min_clients=need,
            participants=participants,
            at_deadline=at_deadline,
        )

    async def list_clients(
        self, request: pb.ListClientsRequest, ctx: RpcContext
    ) -> pb.ListClientsReply:
        """Known clients, with live state for connected ones."""
        self._guard.admit(ctx, "ListClients")
        out = []
        for client in self._store.list_clients():
            session = self._registry.get(client.client_id)
            state = session.state if session is not None and session.streaming else "offline"
            if self._guard.reason(client.client_id) is not None:
                state = "revoked"
            out.append(
                pb.ClientInfo(
                    client_id=client.client_id,
                    state=state,
                    last_seen_unix=session.last_seen if session else client.last_seen,
                    rounds_joined=client.rounds_joined,
                    bytes_up=client.bytes_up,
                    bytes_down=client.bytes_down,
                )
            )
        return pb.ListClientsReply(clients=out)

    async def list_models(
        self, request: pb.ListModelsRequest, ctx: RpcContext
    ) -> pb.ListModelsReply:
        """Model versions, newest first."""
        self._guard.admit(ctx, "ListModels")
        if request.versions:
            if len(request.versions) > 16:
                raise InvalidInputError("at most 16 versions at once")
            wanted = sorted({check_id("version", v) for v in request.versions}, reverse=True)
            models = []
            for version in wanted:
                with contextlib.suppress(NotFoundError):
                    models.append(self._store.get_model(version))
        else:
            models = self._store.list_models(limit=request.limit or None)
        head = self._store.head()
        tags: dict[int, list[str]] = {}
        for tag in self._store.list_tags():  # sorted by name
            tags.setdefault(tag.version, []).append(tag.name)
        infos = [model_info(m) for m in models]
        for info in infos:
            info.tags.extend(tags.get(int(info.version), []))
        return pb.ListModelsReply(models=infos, head=head.version if head else 0)

    async def list_events(
        self, request: pb.ListEventsRequest, ctx: RpcContext
    ) -> pb.ListEventsReply:
        """One page of the event log, newest first (at most :data:`MAX_LISTED_EVENTS`)."""
        self._guard.admit(ctx, "ListEvents")
        before = check_id("before_seq", request.before_seq)
        limit = min(int(request.limit) or 50, MAX_LISTED_EVENTS)
        type_filter = bounded("type", request.type, 64)
        server_round = check_id("server_round", request.server_round)
        events = self._store.events_page(before, limit, type_filter, server_round)
        return pb.ListEventsReply(
            events=[_event_message(e) for e in events], last_seq=self._store.last_event_seq()
        )

    async def watch(self, request: pb.WatchRequest, ctx: RpcContext) -> AsyncIterator[pb.Event]:
        """Replay events after ``since_seq``; then follow until the coordinator stops."""
        seq = check_id("since_seq", request.since_seq)
        self._guard.admit(ctx, "Watch")
        while True:
            self._guard.check(ctx, "Watch")
            batch = self._store.events_since(seq, limit=500)
            for event in batch:
                seq = event.seq
                yield _event_message(event)
            if batch:
                continue
            if request.no_follow or self._events.closed:
                return
            await self._events.wait_beyond(seq, timeout=15.0)

    # ------------------------------------------------------------------ changes

    async def revoke(self, request: pb.RevokeRequest, ctx: RpcContext) -> pb.RevokeReply:
        """Record a revocation with the admin's identity, enforce it, end the open session."""
        self._guard.admit(ctx, "Revoke")
        identity = request.identity
        serial = _parse_serial(request.serial)
        already = is_revoked(self._store, identity, serial)
        with self._store.transaction():
            record = revoke(
                self._store,
                identity,
                serial=serial,
                reason=request.reason,
                author=ctx.identity,
                record_event=False,  # emitted through the event log, which wakes followers
            )
            event = self._events.emit(
                ev.IdentityRevoked(
                    serial=None if serial is None else format(serial, "x"),
                    reason=record.reason,
                    author=record.author,
                ),
                client_id=identity,
            )
        self._guard.add(identity, serial)
        log.info("%s revoked %s (%s)", ctx.identity, identity, request.serial or "all")
        session = self._registry.get(identity)
        if session is not None and (serial is None or session.serial == serial):
            self._registry.end(session, revoked=True)
            self._store.bump_client(identity, state="offline", seen=time.time())
            self._events.emit(ev.ClientLeft(reason="revoked"), client_id=identity, durable=False)
            self._engine.update_arrived()
        return pb.RevokeReply(
            identity=record.identity,
            serial="" if serial is None else format(serial, "x"),
            revoked_at_unix=record.revoked_at,
            already_revoked=already,
            event_seq=event.seq,
            author=record.author,
            reason=record.reason,
        )

    async def rollback(self, request: pb.RollbackRequest, ctx: RpcContext) -> pb.RollbackReply:
        """Roll the head back now, or (a round is running) as soon as that round ends."""
        self._guard.admit(ctx, "Rollback")
        ref = _ref(request.ref)
        reason = bounded("reason", request.reason, _MAX_REASON)
        target = self._store.resolve_model(ref)
        if not self._blobs.has(target.digest):
            raise NotFoundError(
                f"the weights of version {target.version} (blob {target.digest[:12]}) are missing",
                hint="run `flctl models verify` to check every version",
            )
        if not await asyncio.to_thread(self._blobs.verify, target.digest):
            raise IntegrityError(
                f"the weights of version {target.version} are corrupt (blob {target.digest[:12]})",
                hint="run `flctl models verify`; roll back to an intact version",
            )
        # No await from here on: the engine cannot start or end a round in between.
        result = self._engine.rollback(target.version, author=ctx.identity, reason=reason)
        if isinstance(result, PendingRollback):
            message = (
                f"round {result.server_round} is running: the rollback to version "
                f"{target.version} takes effect when it ends, before the next round starts"
            )
            return pb.RollbackReply(
                digest=target.digest,
                source_version=target.version,
                deferred=True,
                message=message,
                server_round=result.server_round,
            )
        new: ModelRecord = result
        return pb.RollbackReply(
            version=new.version,
            digest=new.digest,
            source_version=target.version,
            deferred=False,
            message=f"head is now version {new.version}; the next round starts from it",
            previous_head=new.parent or 0,
        )

    async def evict(self, request: pb.EvictRequest, ctx: RpcContext) -> pb.EvictReply:
        """End a client's session with the admin's identity; it may join again."""
        self._guard.admit(ctx, "Evict")
        client_id = bounded("client_id", request.client_id, 255)
        given = bounded("reason", request.reason, _MAX_REASON)
        session = self._registry.get(client_id)
        if session is None:
            return pb.EvictReply(evicted=False, message=f"{client_id} has no open session")
        self._registry.end(session)
        self._store.bump_client(client_id, state="offline", seen=time.time())
        reason = f"evicted by {ctx.identity}" + (f": {given}" if given else "")
        self._events.emit(ev.ClientEvicted(admin=ctx.identity, reason=given), client_id=client_id)
        self._events.emit(
            ev.ClientLeft(reason=reason, admin=ctx.identity), client_id=client_id, durable=False
        )
        self._engine.update_arrived()
        log.info("%s evicted %s", ctx.identity, client_id)
        return pb.EvictReply(
            evicted=True,
            message=f"{client_id}'s session ended; its token no longer works (it may join again)",
        )

    async def cancel_round(
        self, request: pb.CancelRoundRequest, ctx: RpcContext
    ) -> pb.CancelRoundReply:
        """Cancel the running round and/or queued rounds, with the admin's identity."""
        self._guard.admit(ctx, "CancelRound")
        given = bounded("reason", request.reason, _MAX_REASON)
        reason = f"cancelled by {ctx.identity}" + (f": {given}" if given else "")
        wanted = [check_id("round id", i) for i in request.round_ids]
        running = self._engine.busy_round()
        if not wanted:
            if running is None and not request.queued:
                raise NotFoundError("no round is running", hint="name queued rounds, or --queued")
            wanted = [running] if running is not None else []
        if request.queued:
            wanted += [r.id for r in self._store.list_rounds() if r.status == "queued"]
        cancelled: list[int] = []
        notes: list[str] = []
        for server_round in dict.fromkeys(wanted):
            record = self._store.get_round(server_round)  # NotFoundError for an unknown id
            if server_round == running:
                why_not = self._engine.cancel(server_round, reason)
                if why_not is None:
                    cancelled.append(server_round)
                else:
                    notes.append(why_not)
            elif record.status == "queued":
                end_round(self._store, self._events, server_round, reason, status="cancelled")
                cancelled.append(server_round)
            else:
                notes.append(f"round {server_round} is already {record.status}")
        done = ", ".join(str(r) for r in cancelled) or "none"
        message = f"cancelled: {done}" + ("; " + "; ".join(notes) if notes else "")
        log.info("%s: %s", ctx.identity, message)
        return pb.CancelRoundReply(cancelled=cancelled, message=message)

    async def tag(self, request: pb.TagRequest, ctx: RpcContext) -> pb.TagReply:
        """Name a version, with the admin's identity as the tag's author."""
        self._guard.admit(ctx, "Tag")
        model = self._store.resolve_model(_ref(request.ref))
        before = {t.name: t.version for t in self._store.list_tags()}.get(request.name)
        with self._store.transaction():
            tag = self._store.add_tag(
                model.version, request.name, author=ctx.identity, force=request.force
            )
            if before != model.version:
                self._events.emit(
                    ev.ModelTagged(
                        tag=tag.name, version=tag.version, previous=before, author=ctx.identity
                    )
                )
        return pb.TagReply(version=tag.version, name=tag.name, previous=before or 0)
