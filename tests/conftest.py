"""Suite-wide fixtures: isolation from the user's environment, and shared certificates."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# gRPC's C core reads its log level once, when grpc is first imported. flctl keeps it silent
# (flctl/transport/grpc sets this before it imports grpc); test modules that import grpc
# before flctl would otherwise get gRPC's default and print its lines into the suite's output.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

# The suite starts hundreds of Python subprocesses (flctl commands, coordinators, clients,
# workers). Where PYTHONDONTWRITEBYTECODE is set, each of them would compile flctl's sources
# again, about a quarter of a second per process: they share one bytecode cache for the run
# instead, in a temporary folder (never in the checkout), removed when the run ends.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _PYCACHE = tempfile.mkdtemp(prefix="flctl-tests-pycache-")
    atexit.register(shutil.rmtree, _PYCACHE, ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE
    del os.environ["PYTHONDONTWRITEBYTECODE"]


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
