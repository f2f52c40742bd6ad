"""Suite-wide fixtures: isolation from the user's environment, and shared certificates."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# gRPC's C core reads its log level once, when grpc is first imported. flctl keeps it silent
# (flctl/transport/grpc sets this before it imports grpc); test modules that import grpc
# before flctl would otherwise get gRPC's default and print its lines into the suite's output.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


@pytest.fixture(autouse=True)
def clean_environ(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No FLCTL_* variable from the developer's shell leaks in; logs go to a temp home."""
    for key in list(os.environ):
        if key.startswith("FLCTL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLCTL_HOME", str(tmp_path_factory.mktemp("flctl-home")))
    yield


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One real PostgreSQL server for the whole run (tests/postgres.py); started on first use."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: Any) -> str:
    """The URL of a new, empty PostgreSQL database of its own for this test."""
    return str(postgres_server.new_database())
