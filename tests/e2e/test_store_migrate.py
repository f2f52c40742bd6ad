"""``flctl store migrate --from .flctl/state.db``: a SQLite project moved into PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import flctl, init_project, one_json

pytestmark = pytest.mark.timeout(300)


def _history(proj: Path) -> tuple[Any, Any]:
    models = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    events = one_json(flctl("events", "--json", "--limit", "100000", cwd=proj, check=True).stdout)[
        "events"
    ]
    return models, [(e["seq"], e["type"], e["round"] if "round" in e else None) for e in events]


def test_a_sqlite_project_moves_into_postgresql_and_a_second_run_changes_nothing(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = init_project(tmp_path, "proj")
    flctl(
        "simulate", "--clients", "6", "--rounds", "2", "--per-round", "3", "--workers", "1",
        "--json", cwd=proj, check=True,
    )  # fmt: skip
    models, events = _history(proj)
    assert len(models["models"]) == 3 and events

    # the project now points at PostgreSQL (the URL from the environment), blobs in a new folder
    toml = proj / "flctl.toml"
    toml.write_text(toml.read_text() + '\n[store]\nblobs = "shared-blobs"\n')
    monkeypatch.setenv("FLCTL_STORE_URL", pg_url)
    first = one_json(
        flctl(
            "store", "migrate", "--from", ".flctl/state.db", "--json", cwd=proj, check=True
        ).stdout
    )
    assert first["rows_copied"] > len(events)
    assert first["blobs_copied"] == first["blobs_verified"] >= 3
    assert first["tables"]["events"]["copied"] == len(events)
    # the same history, read from PostgreSQL and the new blob folder
    assert _history(proj) == (models, events)
    verify = flctl("models", "verify", "--json", cwd=proj)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    again = one_json(
        flctl(
            "store", "migrate", "--from", ".flctl/state.db", "--json", cwd=proj, check=True
        ).stdout
    )
    assert again["rows_copied"] == 0 and again["blobs_copied"] == 0
    assert again["tables"]["events"]["skipped"] == len(events)
    assert again["store_id"] == first["store_id"]

    # another project's store does not merge into this one: refused, nothing written
    other = init_project(tmp_path, "other")
    monkeypatch.delenv("FLCTL_STORE_URL")
    flctl(
        "simulate", "--clients", "4", "--rounds", "1", "--per-round", "2", "--workers", "1",
        cwd=other, check=True,
    )  # fmt: skip
    monkeypatch.setenv("FLCTL_STORE_URL", pg_url)
    refused = flctl("store", "migrate", "--from", str(other / ".flctl" / "state.db"), cwd=proj)
    assert refused.returncode == 73, refused.stdout + refused.stderr
    assert "nothing was copied" in refused.stderr and "Traceback" not in refused.stderr
    assert _history(proj) == (models, events)
    blobs = sorted(p.name for p in (proj / "shared-blobs" / "sha256").rglob("*") if p.is_file())
    assert len(blobs) == first["blobs_copied"]  # none of the other project's


def test_migrate_needs_a_database_url(tmp_path: Path) -> None:
    init_project(tmp_path, "proj")
    result = flctl("store", "migrate", "--from", ".flctl/state.db", cwd=tmp_path / "proj")
    assert result.returncode == 10
    assert "[store] url" in result.stderr
