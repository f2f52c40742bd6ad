import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flctl.cli import app
from flctl.store import SqlStore

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "flctl.toml").write_text("")
    store = SqlStore.open(tmp_path / ".flctl")
    try:
        store.append_event("client.joined", client_id="c1")
        store.append_event("round.queued", server_round=1, data={"admin": "ops"})
        store.append_event("round.committed", server_round=1, data={"model_version": 2})
        store.append_event(
            "identity.revoked", client_id="c1", data={"author": "ops", "reason": "lost"}
        )
        store.append_event("model.rollback", data={"author": "local", "version": 3})
    finally:
        store.close()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def events(*args: str) -> list[dict]:  # type: ignore[type-arg]
    result = runner.invoke(app, ["events", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["events"]  # type: ignore[no-any-return]


def test_admin_audit_trail_with_actors(project: Path) -> None:
    audit = events("--type", "admin")
    assert [(e["type"], e["actor"]) for e in audit] == [
        ("round.queued", "ops"),
        ("identity.revoked", "ops"),
        ("model.rollback", "local"),
    ]


def test_type_prefix_since_and_limit(project: Path) -> None:
    assert [e["type"] for e in events("--type", "round")] == ["round.queued", "round.committed"]
    assert [e["seq"] for e in events("--since", "3")] == [4, 5]
    assert [e["seq"] for e in events("--limit", "2")] == [4, 5]
    assert events("--type", "nothing.like.this") == []
    assert [e["seq"] for e in events("--type", "round", "--since", "2")] == [3]
    assert events("--type", "round", "--since", "3") == []
    assert [e["type"] for e in events("--type", "round", "--limit", "1")] == ["round.committed"]


def test_no_store_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flctl.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["events", "--json"])
    assert result.exit_code == 71
    assert "no state store" in json.loads(result.stdout)["error"]["message"]
