"""What only a PostgreSQL store does: refusals with the URL named, never its password."""

from __future__ import annotations

import socket

import pytest

from flctl.core.errors import ConfigError, SchemaMismatchError, StoreUnavailableError
from flctl.store import SqlStore


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_named_without_its_password() -> None:
    url = f"postgresql+psycopg://flctl:s3cret@127.0.0.1:{_closed_port()}/flctl"
    with pytest.raises(StoreUnavailableError) as info:
        SqlStore(url)
    assert "flctl:***@127.0.0.1" in info.value.message
    assert "s3cret" not in str(info.value.to_dict())
    assert info.value.exit_code == 76


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://u@h/db", "SQLite or PostgreSQL only"),
        ("postgresql+asyncpg://u:pw@h/db", "psycopg 3 only"),
        ("not a url", "invalid state database URL"),
    ],
)
def test_urls_flctl_cannot_use_are_config_errors(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        SqlStore(url)
    assert "pw" not in info.value.message


def test_a_schema_newer_than_this_flctl_is_refused_with_both_versions(pg_url: str) -> None:
    store = SqlStore(pg_url)
    with store.session(write=True) as session:
        session.connection().exec_driver_sql(
            "UPDATE meta SET value = '99' WHERE key = 'schema_version'"
        )
        store.commit(session)
    store.close()
    with pytest.raises(SchemaMismatchError) as info:
        SqlStore(pg_url)
    assert "99" in info.value.message and str(SqlStore.SCHEMA_VERSION) in info.value.message
    assert info.value.details == {"found": "99", "expected": SqlStore.SCHEMA_VERSION}
