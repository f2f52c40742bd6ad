from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flctl.store import BlobStore, SqlStore


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    """The same contract, against a SQLite file under tmp_path and an in-memory database."""
    if request.param == "file":
        sql = SqlStore.open(tmp_path / "state")
    else:
        sql = SqlStore("sqlite://")
    yield sql
    sql.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")
