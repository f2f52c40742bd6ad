from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flctl.store import BlobStore, SqlStore


@pytest.fixture(params=["file", "memory", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    """The same contract against a SQLite file under tmp_path, an in-memory SQLite database
    and a new database on a real PostgreSQL server (tests/postgres.py)."""
    if request.param == "file":
        sql = SqlStore.open(tmp_path / "state")
    elif request.param == "memory":
        sql = SqlStore("sqlite://")
    else:
        sql = SqlStore(request.getfixturevalue("pg_url"))
    yield sql
    sql.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")
