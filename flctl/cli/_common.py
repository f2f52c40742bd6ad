"""What several commands share: finding the project, reaching the coordinator as admin."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from flctl.coordinator import read_serve_file
from flctl.core import Config, find_project, load_config
from flctl.core.errors import ConflictError, ConnectError, StoreError
from flctl.security import load_credentials
from flctl.transport.grpc import (
    AdminClient,
    find_leader,
    insecure_channel,
    pb,
    probe_certificate,
    secure_channel,
    split_servers,
)

__all__ = [
    "admin_client",
    "call_admin",
    "coordinator_address",
    "load_project",
    "lock_or_running",
    "refuse_running",
    "retry_connect",
    "round_dict",
    "run_async",
    "setup_logging",
]

T = TypeVar("T")

#: How long an offline command queues behind others writing the state folder.
LOCK_WAIT_S = 30.0
#: How long a command waits for a starting coordinator to write its serve.json.
START_WAIT_S = 60.0


def load_project(config_path: Path | None = None) -> Config:
    """Load ``--config`` or the nearest flctl.toml, its ``[strategy]`` checked too.

    Raises:
        ConfigError: The file fails validation, or ``[strategy]`` names an unknown strategy
            or gives it a key it does not take or a bad value.
    """
    from flctl.coordinator import build_strategy

    path = config_path or find_project()
    config = load_config(path)
    build_strategy(config, path)
    return config


#: The name of the stderr handler :func:`setup_logging` installs (found again by it).
_HANDLER = "flctl"


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines on stderr for long-running commands: plain, or JSON (``--log-format json``).

    Called again (``--log-format json`` installs the handler before the command runs), it
    sets the level and format of the handler it installed. Where the root logger already has
    handlers of others (a test's), it leaves them alone, as :func:`logging.basicConfig` does.
    """
    from flctl.cli._output import settings

    formatter: logging.Formatter
    if settings.log_format == "json":
        from flctl.observe import JsonFormatter

        formatter = JsonFormatter()
        logging.captureWarnings(True)  # warnings too are log lines, not free text on stderr
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    root = logging.getLogger()
    ours = next((h for h in root.handlers if h.get_name() == _HANDLER), None)
    if ours is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER)
        handler.setFormatter(formatter)
        logging.basicConfig(level=level, handlers=[handler])
    else:
        ours.setFormatter(formatter)
        root.setLevel(level)
    logging.getLogger("grpc").setLevel(logging.WARNING)


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion (commands are synchronous functions)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


def coordinator_address(config: Config, server: str | None) -> tuple[str, bool]:
    """Where the coordinator listens (``--server``, else its serve.json), and if plaintext.

    Raises:
        ConnectError: No ``--server`` and no running coordinator recorded in the state folder.
    """
    running = read_serve_file(config.state_path)
    if server and "," in server:
        return _leader_of(config, split_servers(server), running), False
    if server:
        return server, bool(running and running.get("insecure") and running["address"] == server)
    if running is None or not running.get("address"):
        raise ConnectError(
            f"no running coordinator found ({config.state_path / 'serve.json'} is missing)",
            hint="start one with `flctl serve`, or pass --server HOST:PORT",
        )
    return str(running["address"]), bool(running.get("insecure"))


def _leader_of(config: Config, servers: tuple[str, ...], running: dict[str, Any] | None) -> str:
    """The leader among ``--server A,B,...`` (its health service says SERVING).

    Raises:
        ConnectError: None of them leads now.
    """
    insecure = bool(running and running.get("insecure") and running["address"] in servers)
    if insecure:
        return find_leader(servers, insecure=True)
    cert, key, ca = load_credentials(config.certs_path, "admin")
    return find_leader(servers, cert_pem=cert, key_pem=key, ca_pem=ca)


@contextmanager
def lock_or_running(state_path: Path, command: str) -> Iterator[dict[str, Any] | None]:
    """Hold the state folder for an offline change (None), or yield the coordinator's serve.json.

    Writers queue on ``state.lock``, one after the other, for up to :data:`LOCK_WAIT_S`. Holding
    it, a command asks the coordinator's own lock whether one runs: if none does, it yields None
    and writes the state folder directly while it holds both locks (no coordinator can start
    meanwhile); if one does, the change must go through that coordinator's Admin service, and
    this yields its ``serve.json`` (pid, address, insecure), waiting for it while that
    coordinator is still starting (up to :data:`START_WAIT_S`).

    Args:
        state_path: The project's state folder.
        command: What we are (``models tag``), written into the lock for those who wait.

    Raises:
        StoreError: The lock files cannot be opened.
        ConflictError: The wait ran out; the message names what holds the state folder.
    """
    from flctl.coordinator import describe_coordinator, running_serve_file
    from flctl.core import COORDINATOR_LOCK, STATE_LOCK, read_holder, try_lock

    lock_deadline = time.monotonic() + LOCK_WAIT_S
    start_deadline: float | None = None  # set when we first meet a starting coordinator
    with ExitStack() as held:  # closing the lock files releases the locks
        while True:
            try:
                gate = try_lock(state_path / STATE_LOCK, command)
                if gate is not None:
                    held.enter_context(gate)
                    coordinator = try_lock(state_path / COORDINATOR_LOCK)
                    if coordinator is not None:
                        held.enter_context(coordinator)
                        running = None
                        break
                    held.close()  # a coordinator runs: let the other writers by
            except OSError as exc:
                raise StoreError(f"cannot lock {state_path}: {exc}") from exc
            now = time.monotonic()
            if gate is None:  # another offline command writes: queue behind it
                if now >= lock_deadline:
                    holder = read_holder(state_path / STATE_LOCK)
                    who = holder.describe() if holder is not None else "another flctl process"
                    raise ConflictError(
                        f"{state_path} is held by {who}; waited {LOCK_WAIT_S:g} s",
                        hint="retry when that command has finished",
                        details={"holder": None if holder is None else vars(holder)},
                    )
            else:  # a coordinator holds its lock: it runs, or is starting
                running = running_serve_file(state_path)
                if running is not None:
                    break
                start_deadline = start_deadline or now + START_WAIT_S
                if now >= start_deadline:
                    raise ConflictError(
                        f"a coordinator is starting in {state_path} "
                        f"({describe_coordinator(state_path)}) and has not written its "
                        f"serve.json within {START_WAIT_S:g} s",
                        hint="retry when it listens (its log says where), or stop it",
                    )
                lock_deadline = max(lock_deadline, start_deadline)
            time.sleep(0.05)
        yield running


def refuse_running(running: dict[str, Any], why: str, hint: str) -> ConflictError:
    """The error for a change that needs the state folder while a coordinator runs there."""
    pid, address = running.get("pid", "?"), running.get("address", "?")
    return ConflictError(
        f"a coordinator is running (pid {pid}, address {address}): {why}",
        hint=hint,
        details={"pid": running.get("pid"), "address": running.get("address")},
    )


def admin_client(config: Config, server: str | None, *, admin: str = "admin") -> AdminClient:
    """Open an Admin connection with the project's admin certificate."""
    address, insecure = coordinator_address(config, server)
    if insecure:
        return AdminClient(insecure_channel(address), identity=admin)
    cert, key, ca = load_credentials(config.certs_path, admin)
    return AdminClient(
        secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca),
        target=address,
        probe=functools.partial(probe_certificate, address, cert_pem=cert, key_pem=key, ca_pem=ca),
    )


def call_admin(
    config: Config, server: str | None, call: Callable[[AdminClient], Awaitable[T]]
) -> T:
    """Open an Admin connection, run ``call(client)`` to completion, close the connection."""

    async def main() -> T:
        client = admin_client(config, server)
        try:
            return await call(client)
        finally:
            await client.close()

    return asyncio.run(main())


async def retry_connect(
    call: Callable[[], Awaitable[T]], *, timeout: float, on_retry: Callable[[str], None]
) -> T:
    """Run ``call``, retrying on ConnectError until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            return await call()
        except ConnectError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectError(
                    f"the coordinator did not come back within {timeout:g} s: {exc.message}"
                ) from None
            on_retry(exc.message)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


def round_dict(info: pb.RoundInfo) -> dict[str, Any]:
    """A RoundInfo as the JSON object every command prints for a round."""
    from flctl.transport.grpc import from_value_map

    out: dict[str, Any] = {
        "round": int(info.server_round),
        "status": info.status,
        "num_clients": int(info.num_clients),
        "metrics": from_value_map(info.metrics),
        "duration_s": round(info.duration_s, 3),
    }
    if info.reason:
        out["reason"] = info.reason
    if info.model_version:
        out["model_version"] = int(info.model_version)
    if info.phases:  # seconds in each phase (a phase entered twice: both times)
        phases: dict[str, float] = {}
        for p in info.phases:
            phases[p.phase] = round(phases.get(p.phase, 0.0) + p.seconds, 3)
        out["phases"] = phases
    return out
