"""What several commands share: finding the project, reaching the coordinator as admin."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from flctl.coordinator import read_serve_file
from flctl.core import Config, find_project, load_config
from flctl.core.errors import ConnectError, StoreError
from flctl.security import load_credentials
from flctl.transport.grpc import AdminClient, insecure_channel, pb, secure_channel

__all__ = [
    "admin_client",
    "call_admin",
    "coordinator_address",
    "load_project",
    "lock_or_running",
    "retry_connect",
    "round_dict",
    "run_async",
    "setup_logging",
]

T = TypeVar("T")

#: Held (fcntl) by a running coordinator for as long as it runs, and by commands that write
#: its state folder without it.
COORDINATOR_LOCK = "coordinator.lock"


def load_project(config_path: Path | None = None) -> Config:
    """Load ``--config`` or the nearest flctl.toml."""
    return load_config(config_path or find_project())


def setup_logging(level: int = logging.INFO) -> None:
    """Plain log lines on stderr for long-running commands."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
    if server:
        return server, bool(running and running.get("insecure") and running["address"] == server)
    if running is None or not running.get("address"):
        raise ConnectError(
            f"no running coordinator found ({config.state_path / 'serve.json'} is missing)",
            hint="start one with `flctl serve`, or pass --server HOST:PORT",
        )
    return str(running["address"]), bool(running.get("insecure"))


@contextmanager
def lock_or_running(state_path: Path) -> Iterator[dict[str, Any] | None]:
    """Hold the coordinator's lock (yield None), or yield the running coordinator's serve.json.

    A command that changes the state folder writes it directly while it holds the lock (no
    coordinator can start meanwhile); when a coordinator holds it, the change must go through
    that coordinator's Admin service instead. The dict yielded then is its ``serve.json`` (pid,
    address, insecure), empty when it has not written one yet.

    Raises:
        StoreError: The lock file cannot be opened.
    """
    try:
        state_path.mkdir(parents=True, exist_ok=True)
        # "a", not "w": never truncate a file another process may hold open.
        handle = (state_path / COORDINATOR_LOCK).open("a")
    except OSError as exc:
        raise StoreError(f"cannot open {state_path / COORDINATOR_LOCK}: {exc}") from exc
    with handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        yield None if locked else (read_serve_file(state_path) or {})


def admin_client(config: Config, server: str | None, *, admin: str = "admin") -> AdminClient:
    """Open an Admin connection with the project's admin certificate."""
    address, insecure = coordinator_address(config, server)
    if insecure:
        return AdminClient(insecure_channel(address), identity=admin)
    cert, key, ca = load_credentials(config.certs_path, admin)
    return AdminClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))


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
    return out
