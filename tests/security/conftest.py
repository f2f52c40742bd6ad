"""Fixtures of the security suite: one event loop and one live coordinator for the session.

Sharing one coordinator is safe because every test checks, with a snapshot, that its refusal
changed nothing; a test that changes state on purpose (a revocation) does so to identities no
other test uses, and takes its snapshot after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.security.arena import Arena


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The loop every coordinator and caller of the suite runs on.

    It is also the thread's current loop: gRPC binds a channel made outside a coroutine to it.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture(scope="session")
def arena(
    loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Arena]:
    """The shared coordinator, with its round open (see tests/security/arena.py)."""
    arena = Arena.start(tmp_path_factory.mktemp("security") / "project", loop)
    yield arena
    arena.close()
