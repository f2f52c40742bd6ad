"""The Coordinator: opens the state, loads the task, serves both services, runs rounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from flctl.aggregation import Strategy
from flctl.core import COORDINATOR_LOCK, STATE_LOCK, Config, Event, load_task, read_holder, try_lock
from flctl.core import events as ev
from flctl.core._process import process_alive
from flctl.core.errors import ConfigError, ConflictError, FlctlError, IntegrityError, TaskError
from flctl.security import TokenSigner, identity_from_pem, load_credentials
from flctl.store import BlobStore, ModelRecord, SqlStore, open_store
from flctl.tensors import (
    SecureLayout,
    TensorSpec,
    describe_spec_difference,
    fingerprint,
    read_spec,
    sha256_file,
)
from flctl.transport.grpc import (
    ConnectionLimits,
    ConnectionWatch,
    Health,
    ServerCredentials,
    fitting_limits,
    is_loopback_host,
    raise_descriptor_limit,
    split_address,
    start_server,
)

from ._admin import AdminService
from ._engine import RoundEngine, end_round
from ._events import EventLog
from ._guard import RevocationGuard
from ._integrity import ModelCheck
from ._leading import Election, advertised
from ._local import LocalClients
from ._registry import Registry, Session
from ._service import CoordinatorService, Limits
from ._strategy import (
    STRATEGY_FN,
    build_strategy,
    call_strategy_fn,
    strategy_name,
    task_strategy,
)
from ._task import coordinator_context, make_evaluator, task_model_spec, write_initial_model
from ._uploads import PartialUploads

__all__ = [
    "CERT_EXPIRY_WARNING_DAYS",
    "Coordinator",
    "SERVE_FILE",
    "describe_coordinator",
    "read_serve_file",
    "running_serve_file",
]

log = logging.getLogger("flctl.coordinator")

#: Written into the state folder while a coordinator runs: pid and the address it bound.
SERVE_FILE = "serve.json"

#: ``serve`` warns at start when its own certificate expires within this many days.
CERT_EXPIRY_WARNING_DAYS = 14


def read_serve_file(state_dir: Path) -> dict[str, Any] | None:
    """Return the running coordinator's ``serve.json`` (pid, address), or None."""
    try:
        data = json.loads((state_dir / SERVE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def running_serve_file(state_dir: Path) -> dict[str, Any] | None:
    """The ``serve.json`` of the coordinator holding ``coordinator.lock``, once it listens.

    Call it only when that lock is known to be held. None while that coordinator starts: it
    has written no ``serve.json`` yet, or the one there names another pid than the lock's (an
    earlier coordinator's, killed before it could remove its file) or a dead process.
    """
    running = read_serve_file(state_dir)
    if running is None or not running.get("address"):
        return None
    holder = read_holder(state_dir / COORDINATOR_LOCK)
    if holder is None or holder.pid is None:  # the lock does not say whose it is
        return running if process_alive(running.get("pid")) else None
    return running if running.get("pid") == holder.pid else None


def describe_coordinator(state_dir: Path) -> str:
    """``pid 4242, address 127.0.0.1:7070`` (or ``pid 4242, starting since 12:03:04``).

    Call it only when ``coordinator.lock`` is known to be held.
    """
    running = running_serve_file(state_dir)
    if running is not None:
        return f"pid {running.get('pid', '?')}, address {running['address']}"
    holder = read_holder(state_dir / COORDINATOR_LOCK)
    if holder is None or holder.pid is None:
        return "starting; no serve.json yet"
    since = (
        ""
        if holder.since is None
        else f" since {time.strftime('%H:%M:%S', time.localtime(holder.since))}"
    )
    return f"pid {holder.pid}, starting{since}"


#: How long a starting coordinator waits for an offline command holding the state folder.
LOCK_WAIT_S = 10.0


class Coordinator:
    """One coordinator over one state folder.

    Args:
        config: The project's configuration.
        address: Overrides ``server.address`` (``HOST:0`` picks a free port).
        advertise: Overrides ``server.advertise``.
        insecure: Overrides ``server.insecure`` (plaintext, loopback only).
    """

    def __init__(
        self,
        config: Config,
        *,
        address: str | None = None,
        insecure: bool | None = None,
        new_state: bool = False,
        in_process: bool = False,
        advertise: str | None = None,
    ) -> None:
        self.config = config
        #: The address clients reach this coordinator at, if not the bound one (``--advertise``).
        self.advertise = advertise or config.server.advertise
        #: Serve in-process clients only (``flctl simulate``): no listener, no certificates,
        #: a selection seeded by the project's seed; :attr:`local` is the transport's
        #: coordinator end once started.
        self.in_process = in_process
        self.local: LocalClients | None = None
        #: What each queued round records as its config (the job's settings).
        self._snapshot: dict[str, Any] = {}
        #: Start a new state store even where one was lost (``serve --new-state``).
        self.new_state = new_state
        self.address = address or config.server.address
        self.insecure = config.server.insecure if insecure is None else insecure
        self.state_dir = config.state_path
        self.bound_address = ""
        self._listeners: list[Callable[[Event], None]] = []
        self._lock: IO[str] | None = None
        self._wrote_serve_file = False
        self._started = False
        self._server: Any = None
        self._engine_task: asyncio.Task[None] | None = None
        self._reaper_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.store: SqlStore | None = None
        self.events: EventLog | None = None
        self._engine: RoundEngine | None = None
        self._registry: Registry | None = None
        #: The leadership of a store shared through PostgreSQL (None: SQLite, one coordinator).
        self.election: Election | None = None
        self._election_task: asyncio.Task[None] | None = None
        #: The standard gRPC health service: SERVING while this coordinator serves rounds.
        self.health = Health()

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event (for the live panel); before or after start."""
        self._listeners.append(listener)
        if self.events is not None:
            self.events.subscribe(listener)

    async def _take_lock(self) -> None:
        """Hold ``coordinator.lock`` for as long as we run, or refuse: one per state folder.

        The lock is taken behind ``state.lock``, on which offline commands (``models
        rollback``, ``tag``, ``import``, ``gc``) queue while they write the state folder: this
        waits up to :data:`LOCK_WAIT_S` for them, then lets go of ``state.lock`` again. A
        coordinator already holding ``coordinator.lock`` is refused at once.

        Raises:
            ConflictError: Another coordinator runs here, or an offline command held the state
                folder for longer than :data:`LOCK_WAIT_S`.
        """
        wait_s = LOCK_WAIT_S
        deadline = time.monotonic() + wait_s
        state_lock = self.state_dir / STATE_LOCK
        while (gate := try_lock(state_lock, "serve")) is None:
            if time.monotonic() >= deadline:
                holder = read_holder(state_lock)
                who = holder.describe() if holder is not None else "another flctl process"
                raise ConflictError(
                    f"another flctl command has held {self.state_dir} for {wait_s:g} s: {who}",
                    hint="start the coordinator when that command has finished",
                    details={"holder": None if holder is None else vars(holder)},
                )
            await asyncio.sleep(0.05)
        with gate:  # offline commands wait while we take the coordinator's own lock
            handle = try_lock(self.state_dir / COORDINATOR_LOCK, "serve")
        if handle is None:
            running = describe_coordinator(self.state_dir)
            raise ConflictError(
                f"another coordinator holds {self.state_dir} ({running})",
                hint="stop it first, or give this one another project.state_dir",
            )
        self._lock = handle

    async def start(self) -> str:
        """Open the state, ensure the initial model, listen; return the bound ``HOST:PORT``.

        In-process (``in_process``), nothing listens: :attr:`local` takes the clients, and the
        address returned is "in-process".
        """
        config = self.config
        host, _ = split_address(self.address)  # fail on bad options before touching state
        if self.advertise:
            split_address(self.advertise)
        strategy = build_strategy(config)
        if self.insecure and not is_loopback_host(host):
            raise ConfigError(
                f"--insecure refuses to listen on {self.address!r}: plaintext is for loopback only",
                hint="use mutual TLS (drop --insecure) or bind 127.0.0.1",
            )
        credentials = None
        cert_pem = b""
        if not self.insecure and not self.in_process:
            cert, key, ca = load_credentials(config.certs_path, "server")
            credentials = ServerCredentials(cert, key, ca)
            cert_pem = cert
        from flctl.core.errors import NotFoundError
        from flctl.store import require_state

        if not self.new_state:
            # A lost or damaged store is refused before the lock files are written: nothing
            # in the state folder changes. open_store checks again under the lock.
            with contextlib.suppress(NotFoundError):  # a fresh folder: open creates the store
                require_state(config)
        # task.py, and the strategy its strategy_fn returns, are refused before anything in
        # the state folder is written
        task = await asyncio.to_thread(load_task, config.task_path)
        context = coordinator_context(config)
        custom = await asyncio.to_thread(task_strategy, task, config, context)
        if custom is not None:
            strategy = custom
            log.info(
                "strategy: %r from %s's %s (the [strategy] table is not used)",
                strategy_name(strategy),
                config.task_path.name,
                STRATEGY_FN,
            )

            def new_strategy() -> Strategy:
                return call_strategy_fn(task.strategy_fn, context, config.task_path)

        else:

            def new_strategy() -> Strategy:
                return build_strategy(config)

        await self._take_lock()
        store = self.store = open_store(config, new_state=self.new_state, deep_check=True)
        if store.replaced_path is not None:
            log.warning(
                "started a new state store (--new-state); the old database is kept as %s",
                store.replaced_path,
            )
        if store.backup_path is not None:
            log.warning(
                "migrated the state database from schema %s to %s; the database as it was "
                "is backed up in %s",
                store.migrated_from,
                SqlStore.SCHEMA_VERSION,
                store.backup_path,
            )
        if store.dialect == "postgresql" and not self.in_process:
            await self._elect(task, store, credentials)
        blobs = BlobStore(config.blobs_path)
        blobs.clean_temp()
        uploads = PartialUploads(config.uploads_path)
        events = self.events = EventLog(store)
        for listener in self._listeners:
            events.subscribe(listener)

        head = store.head()
        created = head is None
        if head is None:
            temp, handle = blobs.temp_file()
            handle.close()
            try:
                await asyncio.to_thread(write_initial_model, task, config, temp)
                digest = blobs.commit_temp(temp, sha256_file(temp))
            finally:
                temp.unlink(missing_ok=True)
            with store.transaction():
                head = store.add_model(digest=digest, kind="initial", set_head=True)
                events.emit(
                    ev.ModelCreated(
                        version=head.version, digest=digest, kind="initial", parent=None
                    )
                )
        check = ModelCheck(store, blobs, events)
        if created:
            check.trust(head.digest)
        head_problem = await check.check(head)
        if head_problem is None:
            model_spec = read_spec(blobs.path(head.digest))
            if not created:
                await self._check_task_builds_head(task, head, model_spec)
        else:  # serve all the same, refusing rounds, so that an admin can roll back
            model_spec = self._readable_spec(store, blobs, head_problem)
        if blobs.has(head.digest):
            model_size = blobs.size(head.digest)
        else:  # a missing head: what task.py's model takes (a safetensors file, near enough)
            model_size = sum(spec.numel * 8 for spec in model_spec.values())
        max_update = config.transport.max_update_bytes or (model_size + model_size // 4 + (1 << 20))
        if config.secagg.enabled and not config.transport.max_update_bytes:
            # a masked input holds 4 or 8 bytes per float element, whatever the model's dtype
            masked = 8 * SecureLayout.of(model_spec).num_elements + (1 << 20)
            max_update = max(max_update, masked)
        limits = Limits(
            max_chunk_bytes=config.transport.max_chunk_bytes,
            max_update_bytes=max_update,
            max_tensors=len(model_spec),
        )
        registry = self._registry = Registry()
        guard = RevocationGuard.load(
            store,
            events,
            rate_per_s=config.server.rate_limit_per_s,
            burst=config.server.rate_limit_burst,
        )
        engine = self._engine = RoundEngine(
            config=config,
            store=store,
            blobs=blobs,
            events=events,
            registry=registry,
            strategy=strategy,
            evaluator=make_evaluator(task, config),
            uploads=uploads,
            check=check,
            new_strategy=new_strategy,
            # a simulation repeats: the same seed selects the same clients each round
            selection_rng=random.Random(f"{config.project.seed}/selection")
            if self.in_process
            else None,
        )
        # The round open when the coordinator stopped carries on if it can; others fail.
        resumed: int | None = None
        for record in store.open_rounds():
            why = engine.resumable(record) if resumed is None else "coordinator restarted"
            if why is None:
                engine.resume(record)
                resumed = record.id
                continue
            engine.charge_released(record.id)  # local DP: accepted noised updates count
            end_round(store, events, record.id, why)
        uploads.discard_except(resumed)
        # Rollbacks deferred behind a round that is over now (a restart ended it) apply now;
        # those waiting for the resumed round, when it ends.
        engine.apply_pending(keep_round=resumed)
        # the strategy carries on from the state recorded with the head: refused at start when
        # it does not belong to the configured strategy; a missing blob fails each round with
        # the reason instead, so that an admin can still roll back
        try:
            engine.sync_state()
        except IntegrityError as exc:
            log.warning("%s", exc.message)
        coordinator_service = CoordinatorService(
            store=store,
            blobs=blobs,
            events=events,
            registry=registry,
            engine=engine,
            signer=TokenSigner.generate(),
            limits=limits,
            model_spec=model_spec,
            task_fingerprint=fingerprint(model_spec),
            heartbeat_interval_s=config.server.heartbeat_interval_s,
            heartbeat_timeout_s=config.server.heartbeat_timeout_s,
            min_free_bytes=int(config.server.min_free_mb * (1 << 20)),
            token_ttl_s=config.server.token_ttl_s,
            guard=guard,
            uploads=uploads,
            transport=config.transport,
        )
        admin_service = AdminService(
            store=store,
            blobs=blobs,
            events=events,
            registry=registry,
            engine=engine,
            guard=guard,
            state_dir=str(self.state_dir),
            max_chunk_bytes=config.transport.max_chunk_bytes,
            config_snapshot=self._snapshot,
        )
        self._snapshot.update(
            {
                "rounds": vars(config.rounds),
                "strategy": (
                    {"name": strategy_name(strategy), STRATEGY_FN: True}
                    if custom is not None
                    else {"name": config.strategy.name, **config.strategy.params}
                ),
                "task": dict(config.task),
                "seed": config.project.seed,
                # recorded with every version these rounds make (models show)
                **({"secagg": vars(config.secagg)} if config.secagg.enabled else {}),
            }
        )
        if self.in_process:
            self.local = LocalClients(coordinator_service, blobs, config.transport.max_chunk_bytes)
            self._engine_task = asyncio.create_task(engine.run(), name="flctl-round-engine")
            events.emit(
                ev.CoordinatorStarted(
                    address="in-process",
                    pid=os.getpid(),
                    state_dir=str(self.state_dir),
                    head_version=head.version,
                    is_insecure=False,
                )
            )
            self._started = True
            return "in-process"
        connection_limits = fitting_limits(
            ConnectionLimits(
                handshake_timeout_s=config.server.handshake_timeout_s,
                max_connections=config.server.max_connections,
                max_connections_per_peer=config.server.max_connections_per_peer,
            ),
            raise_descriptor_limit(),
        )
        self._server, port = await start_server(
            self.address,
            coordinator_service,
            admin_service,
            credentials=credentials,
            max_chunk_bytes=config.transport.max_chunk_bytes,
            allow_admin_clients=config.server.allow_admin_clients,
            on_refused=self._record_refusal,
            connection_limits=connection_limits,
            health=self.health,
        )
        watch = ConnectionWatch(port, connection_limits, self._record_connection_refusal)
        self._watch_task = asyncio.create_task(watch.run(), name="flctl-connection-watch")
        host, _ = split_address(self.address)
        self.bound_address = f"{host}:{port}"
        self._write_serve_file()
        if self.election is not None:
            self._election_task = asyncio.create_task(
                self.election.watch(self.advertise or advertised(self.bound_address)),
                name="flctl-leadership-watch",
            )
        await self.health.set(True)
        self._engine_task = asyncio.create_task(engine.run(), name="flctl-round-engine")
        self._reaper_task = asyncio.create_task(self._reap(), name="flctl-heartbeat-reaper")
        events.emit(
            ev.CoordinatorStarted(
                address=self.bound_address,
                pid=os.getpid(),
                state_dir=str(self.state_dir),
                head_version=head.version,
                is_insecure=self.insecure,
            )
        )
        self._started = True
        if cert_pem:
            self._warn_if_expiring(cert_pem, events)
        log.info("coordinator listening on %s (state %s)", self.bound_address, self.state_dir)
        return self.bound_address

    async def _elect(
        self, task: ModuleType, store: SqlStore, credentials: ServerCredentials | None
    ) -> None:
        """Lead the shared store before serving; stand by on our address until then.

        A task that builds another model than the shared head is refused before standing by.
        """
        blobs = BlobStore(self.config.blobs_path)
        head = store.head()
        if head is not None and blobs.has(head.digest):
            await self._check_task_builds_head(task, head, read_spec(blobs.path(head.digest)))
        self.election = Election(store, self.advertise or advertised(self.address))
        self.health = self.election.health
        self.address = await self.election.lead(
            address=self.address,
            credentials=credentials,
            max_chunk_bytes=self.config.transport.max_chunk_bytes,
            advertise=self.advertise,
        )

    @property
    def leadership_lost(self) -> asyncio.Event | None:
        """Set when this coordinator lost the leadership of a shared store (None: not shared)."""
        return None if self.election is None else self.election.lost_event

    def busy_round(self) -> int | None:
        """The round the engine is running, if any."""
        return None if self._engine is None else self._engine.busy_round()

    def queue_rounds(self, count: int, *, admin: str, **extra: Any) -> list[int]:
        """Queue ``count`` rounds as ``round start`` does; ``extra`` joins their recorded config.

        Returns:
            The new rounds' ids.
        """
        assert self.store is not None and self.events is not None and self._engine is not None
        ids = self.store.create_rounds(count, {**self._snapshot, **extra})
        for server_round in ids:
            self.events.emit(ev.RoundQueued(admin=admin), server_round=server_round)
        self._engine.notify()
        return ids

    def _readable_spec(
        self, store: SqlStore, blobs: BlobStore, head_problem: str
    ) -> dict[str, TensorSpec]:
        """The tensors of the newest version whose header reads (the head's may not).

        Every version of a state folder holds the same tensors: the limits and checks that
        need them work from any of them while the head is corrupt.

        Raises:
            IntegrityError: No version's blob reads.
        """
        for record in store.list_models(include_rejected=False):
            with contextlib.suppress(FlctlError, OSError):
                return read_spec(blobs.path(record.digest))
        raise IntegrityError(
            head_problem, hint="restore the state folder from a backup (`flctl store restore`)"
        )

    async def _check_task_builds_head(
        self, task: ModuleType, head: ModelRecord, head_spec: dict[str, TensorSpec]
    ) -> None:
        """Refuse to serve a head model that the project's task.py no longer builds.

        Clients build their model from task.py and could never load such a head: every round
        would fail on a tensor mismatch. This happens when a project is copied with the state
        folder of another model, or task.py changed the architecture.

        Raises:
            TaskError: The shapes, dtypes or names differ; nothing was changed.
        """
        built = await asyncio.to_thread(task_model_spec, task, self.config)
        if fingerprint(built) == fingerprint(head_spec):
            return
        difference = describe_spec_difference(head_spec, built, expected_name="the head's")
        raise TaskError(
            f"{self.config.task_path.name} builds a model that differs from the head model "
            f"v{head.version} in {self.state_dir}: {difference}",
            hint=f"this state folder holds another model's history: start a new one (move "
            f"{self.state_dir} away, or point project.state_dir at a new folder), or restore "
            f"the task.py that built v{head.version}",
        )

    def _warn_if_expiring(self, cert_pem: bytes, events: EventLog) -> None:
        """Log and record a warning when our own certificate expires soon (or has)."""
        identity = identity_from_pem(cert_pem)
        days = (identity.not_after - datetime.now(UTC)).total_seconds() / 86400.0
        if days >= CERT_EXPIRY_WARNING_DAYS:
            return
        when = f"{identity.not_after:%Y-%m-%d %H:%M} UTC"
        file = self.config.certs_path / "server.crt"
        if days < 0:
            message = f"the coordinator's certificate ({file}) expired on {when}"
        else:
            message = (
                f"the coordinator's certificate ({file}) expires in {days:.1f} days, on {when}"
            )
        hint = (
            "clients refuse an expired server certificate: replace server.crt and server.key "
            "with ones from the project's CA, then restart the coordinator"
        )
        log.warning("%s; %s", message, hint)
        events.emit(
            ev.CoordinatorWarning(
                message=message,
                hint=hint,
                certificate=str(file),
                not_after=identity.not_after.isoformat(),
                days_left=round(days, 2),
            )
        )

    def _write_serve_file(self) -> None:
        data = {
            "pid": os.getpid(),
            "address": self.bound_address,
            "insecure": self.insecure,
            "started_unix": time.time(),
        }
        temp = self.state_dir / f".{SERVE_FILE}.tmp"
        temp.write_text(json.dumps(data))
        os.replace(temp, self.state_dir / SERVE_FILE)
        self._wrote_serve_file = True

    def _remove_serve_file(self) -> None:
        """Remove ``serve.json`` if this process wrote it, and only then.

        A coordinator refused at start (another one runs) never wrote one, so it must leave the
        running coordinator's file alone; a file naming another pid is not ours either.
        """
        if not self._wrote_serve_file:
            return
        self._wrote_serve_file = False
        running = read_serve_file(self.state_dir)
        if running is not None and running.get("pid") != os.getpid():
            return
        with contextlib.suppress(OSError):
            (self.state_dir / SERVE_FILE).unlink()

    def _record_refusal(self, identity: str, rpc: str, reason: str) -> None:
        """A caller the transport refused for its role, in the event log."""
        if self.events is not None:
            self.events.emit(
                ev.SecurityRefused(identity=identity, reason=reason, rpc=rpc), client_id=identity
            )

    def _record_connection_refusal(self, peer: str, reason: str) -> None:
        """Connections closed or refused by a bound (before any identity), in the event log."""
        if self.events is not None:
            self.events.emit(
                ev.SecurityRefused(identity=None, peer=peer or None, reason=reason, rpc="connect")
            )

    async def _reap(self) -> None:
        """End the sessions of silent clients and of clients whose certificate expired.

        Silent: no heartbeat for ``server.heartbeat_timeout_s``. Expired: the task stream ends
        refused, saying "expired", and a ``client.left`` event records why.
        """
        timeout = self.config.server.heartbeat_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            registry, store, events = self._registry, self.store, self.events
            if registry is None or store is None or events is None:
                continue
            now = time.time()
            for client_id, session in registry.items():
                try:
                    self._reap_one(client_id, session, now, timeout)
                except FlctlError as exc:  # a full disk, say: the session still ends
                    log.warning(
                        "%s: could not record the end of its session: %s",
                        client_id,
                        exc,
                        extra={"client": client_id},
                    )

    def _reap_one(self, client_id: str, session: Session, now: float, timeout: float) -> None:
        """End ``session`` if its certificate expired or it has been silent too long.

        The session ends (and the engine hears of it) before anything is written, so a store
        that cannot be written (a full disk) does not keep a gone client in the round.
        """
        registry, store, events = self._registry, self.store, self.events
        assert registry is not None and store is not None and events is not None
        expired = bool(session.not_after and now >= session.not_after)
        if expired:
            session.expired = True
        silent = now - session.last_seen
        if not expired and silent <= timeout:
            return
        if not registry.end(session):
            return
        if self._engine is not None:
            self._engine.update_arrived()
        if expired:
            when = datetime.fromtimestamp(session.not_after, UTC)
            reason = f"certificate expired at {when:%Y-%m-%d %H:%M:%S} UTC"
            log.info("%s: %s: session ended", client_id, reason, extra={"client": client_id})
            store.bump_client(client_id, state="offline", seen=now)
            events.emit(ev.ClientLeft(reason=reason, is_expired=True), client_id=client_id)
            return
        log.info("%s silent for %.1f s: dropped", client_id, silent, extra={"client": client_id})
        store.bump_client(client_id, state="offline", seen=session.last_seen)
        events.emit(
            ev.ClientLeft(reason=f"no heartbeat for {silent:.1f} s (timeout {timeout:g} s)"),
            client_id=client_id,
        )

    async def drain(self, timeout: float) -> bool:
        """Start no new round; give the running one ``timeout`` seconds to end.

        Returns:
            Whether the running round (if any) ended in time; call :meth:`stop` either way.
        """
        engine, task = self._engine, self._engine_task
        if engine is None or task is None:
            return True
        busy = engine.drain()
        await self.health.set(False)
        if self.events is not None:
            self.events.emit(
                ev.CoordinatorDraining(timeout_s=timeout, server_round=busy),
                server_round=busy or 0,
            )
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, reason: str = "stopped") -> None:
        """Stop serving: fail the open round, end every stream, close the state."""
        if self._election_task is not None:
            self._election_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._election_task
            self._election_task = None
        if self.election is not None and self.election.lost is not None:
            reason = f"lost the leadership: {self.election.lost.message}"
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._reaper_task is not None:
            self._reaper_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper_task
            self._reaper_task = None
        if self._engine is not None:
            self._engine.stop()
        if self.local is not None:
            self.local.close()
        if self._registry is not None:
            self._registry.close_all()
        if self._engine_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._engine_task), 5.0)
            except TimeoutError:
                self._engine_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._engine_task
        if self._engine is not None:
            await self._engine.close()  # scoring still running stops before the store closes
        if self.events is not None:
            if self._started:  # one refused at start never started: nothing to record
                try:
                    self.events.emit(ev.CoordinatorStopped(reason=reason))
                except FlctlError as exc:  # the store is gone (or no longer ours): stop anyway
                    log.warning("could not record the stop: %s", exc.message)
            self.events.close()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        self._remove_serve_file()
        if self.election is not None:
            await asyncio.to_thread(self.election.release, reason)
        if self.store is not None:
            self.store.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
