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


@pytest.fixture(autouse=True)
def _reopen_refused_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Reopen the arena round's tasks that a test's malformed upload closed.

    An update refused as malformed is final for its task (the coordinator answers any new
    upload for it at once): tests that send one as ``c1`` would otherwise leave every later
    test only that answer. The round itself is untouched (a refusal does not end it).
    """
    yield
    if "arena" in request.fixturenames:
        engine = request.getfixturevalue("arena").coordinator._engine
        if engine is not None and engine.open is not None:
            engine.open.refused.clear()


@pytest.fixture(scope="session")
def arena(
    loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Arena]:
    """The shared coordinator, with its round open (see tests/security/arena.py)."""
    arena = Arena.start(tmp_path_factory.mktemp("security") / "project", loop)
    yield arena
    arena.close()
