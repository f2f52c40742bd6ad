"""The model registry in the store: references, lineage, tags, head moves, checks, migration."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from flctl.core.errors import ConflictError, InvalidInputError, NotFoundError
from flctl.store import (
    BlobStore,
    SqlStore,
    TagRecord,
    collect_garbage,
    verify_models,
)

D1, D2, D3 = ("a1" * 32, "b2" * 32, "c3" * 32)
CONFIG = {"rounds": {"strategy": "fedavg", "min_clients": 2}, "task": {"lr": 0.05}, "seed": 0}


def _history(store: SqlStore) -> None:
    """v1 initial, v2 and v3 aggregates of rounds 1 and 2 (the latter with two clients)."""
    store.add_model(digest=D1, kind="initial", set_head=True, author="coordinator")
    for digest in (D2, D3):
        [server_round] = store.create_rounds(1, CONFIG)
        store.set_round_status(server_round, "training", base_version=1, selected=["c1", "c2"])
        store.add_update(
            server_round=server_round,
            client_id="c1",
            task_id="t",
            status="accepted",
            digest="d" * 64,
            num_examples=10,
        )
        store.commit_round(server_round, digest=digest, metrics={"accuracy": 0.5}, num_clients=1)


# -- commit_round keeps the round's config --------------------------------------------------


def test_commit_round_records_config_author_and_status(store: SqlStore) -> None:
    _history(store)
    v3 = store.get_model(3)
    assert (v3.kind, v3.author, v3.status, v3.reason) == ("aggregate", "round", "ok", "")
    assert v3.config == CONFIG
    canonical = (
        '{"rounds": {"min_clients": 2, "strategy": "fedavg"}, "seed": 0, "task": {"lr": 0.05}}'
    )
    assert v3.config_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert store.get_model(1).config == {} and store.get_model(1).config_hash == ""


def test_rejected_commit_is_stored_but_head_stays(store: SqlStore) -> None:
    _history(store)
    [server_round] = store.create_rounds(1)
    store.set_round_status(server_round, "training")
    model = store.commit_round(
        server_round,
        digest="e" * 64,
        metrics={"accuracy": 0.1},
        num_clients=2,
        status="rejected",
        reason="accuracy regressed",
    )
    assert model.is_rejected and model.reason == "accuracy regressed" and model.parent == 3
    head = store.head()
    assert head is not None and head.version == 3
    assert [m.version for m in store.list_models(include_rejected=False)] == [3, 2, 1]
    assert [m.version for m in store.list_models()] == [4, 3, 2, 1]
    ended = store.get_round(server_round)
    assert (ended.status, ended.reason, ended.model_version) == (
        "rejected",
        "accuracy regressed",
        4,
    )
    assert ended.is_terminal
    with pytest.raises(InvalidInputError, match="commit_round"):
        store.set_round_status(server_round, "rejected")
    with pytest.raises(InvalidInputError, match="rejected"):
        store.add_model(digest=D1, kind="import", status="rejected", set_head=True)


# -- resolve --------------------------------------------------------------------------------


def test_resolve_version_head_tag_and_digest_prefix(store: SqlStore) -> None:
    _history(store)
    store.add_tag(2, "best")
    assert store.resolve_model("2").version == 2
    assert store.resolve_model(" 3 ").version == 3
    assert store.resolve_model("head").version == 3
    assert store.resolve_model("best").version == 2
    assert store.resolve_model(D3[:6]).version == 3
    assert store.resolve_model(D2).version == 2


def test_resolve_refusals(store: SqlStore) -> None:
    _history(store)
    with pytest.raises(NotFoundError, match="version 9"):
        store.resolve_model("9")
    with pytest.raises(NotFoundError, match="no model version, tag or digest"):
        store.resolve_model("nosuchtag")
    with pytest.raises(NotFoundError, match="digest starting with"):
        store.resolve_model("ffffff")
    with pytest.raises(InvalidInputError, match="too short"):
        store.resolve_model("a1a1")
    with pytest.raises(InvalidInputError, match="empty"):
        store.resolve_model("  ")


def test_ambiguous_digest_prefix_names_the_versions(store: SqlStore) -> None:
    store.add_model(digest="abcdef" + "0" * 58, kind="initial", set_head=True)
    store.add_model(digest="abcdef" + "1" * 58, kind="import")
    with pytest.raises(InvalidInputError, match=r"ambiguous digest prefix .* versions \[1, 2\]"):
        store.resolve_model("abcdef")
    assert store.resolve_model("abcdef1").version == 2


def test_a_digest_shared_by_a_rollback_resolves_to_its_first_version(store: SqlStore) -> None:
    _history(store)
    store.set_head(2, author="local")
    assert store.resolve_model(D2[:8]).version == 2
    assert store.versions_with_digest(D2) == [2, 4]


# -- lineage --------------------------------------------------------------------------------


def test_lineage_follows_parents_to_the_initial_model(store: SqlStore) -> None:
    _history(store)
    store.set_head(1, author="local")
    assert [m.version for m in store.lineage(4)] == [4, 3, 2, 1]
    assert [m.version for m in store.lineage(1)] == [1]
    with pytest.raises(NotFoundError):
        store.lineage(42)


# -- tags -----------------------------------------------------------------------------------


def test_tags_add_move_list_and_remove(store: SqlStore) -> None:
    _history(store)
    tag = store.add_tag(2, "best", author="local")
    assert isinstance(tag, TagRecord) and (tag.name, tag.version, tag.author) == (
        "best",
        2,
        "local",
    )
    store.add_tag(2, "best")  # the same again is a no-op
    store.add_tag(2, "paper-v1.0")
    assert store.tags_for(2) == ["best", "paper-v1.0"]
    with pytest.raises(ConflictError, match="already names version 2"):
        store.add_tag(3, "best")
    store.add_tag(3, "best", force=True)
    assert store.tags_for(2) == ["paper-v1.0"] and store.tags_for(3) == ["best"]
    assert [(t.name, t.version) for t in store.list_tags()] == [("best", 3), ("paper-v1.0", 2)]
    store.remove_tag("best")
    assert store.tags_for(3) == []
    with pytest.raises(NotFoundError):
        store.remove_tag("best")


@pytest.mark.parametrize("name", ["", "1", "12", "head", "deadbeef", "-x", "a b", "x" * 65, "é"])
def test_bad_tag_names_are_refused(store: SqlStore, name: str) -> None:
    _history(store)
    with pytest.raises(InvalidInputError):
        store.add_tag(1, name)


def test_tag_on_a_missing_version(store: SqlStore) -> None:
    with pytest.raises(NotFoundError):
        store.add_tag(1, "best")


# -- head moves -----------------------------------------------------------------------------


def test_rollback_writes_a_new_version_with_the_old_digest(store: SqlStore) -> None:
    _history(store)
    before = store.list_models()
    new = store.set_head(2, author="admin", reason="v3 diverged")
    assert (new.version, new.kind, new.digest, new.parent, new.source) == (4, "rollback", D2, 3, 2)
    assert (new.author, new.reason, new.server_round) == ("admin", "v3 diverged", None)
    assert new.metrics == store.get_model(2).metrics and new.config == CONFIG
    head = store.head()
    assert head is not None and head.version == 4
    assert store.list_models()[1:] == before  # history is never rewritten
    with pytest.raises(ConflictError, match="already holds the weights"):
        store.set_head(2, author="admin")
    with pytest.raises(NotFoundError):
        store.set_head(9, author="admin")


def test_import_is_not_head_unless_asked(store: SqlStore) -> None:
    _history(store)
    imported = store.import_model(D1, head=False, author="local", reason="from a.safetensors")
    assert (imported.kind, imported.parent, imported.author) == ("import", 3, "local")
    head = store.head()
    assert head is not None and head.version == 3
    second = store.import_model("f" * 64, head=True, author="local")
    head = store.head()
    assert head is not None and head.version == second.version == 5 and second.parent == 3


# -- verify and gc --------------------------------------------------------------------------


def test_verify_reports_ok_missing_and_corrupt(store: SqlStore, blobs: BlobStore) -> None:
    good, bad, gone = blobs.put_bytes(b"good"), blobs.put_bytes(b"bad"), blobs.put_bytes(b"x")
    store.add_model(digest=good, kind="initial", set_head=True)
    store.add_model(digest=bad, kind="import")
    store.add_model(digest=gone, kind="import")
    store.add_model(digest=good, kind="import")
    blobs.path(bad).write_bytes(b"bae")
    blobs.path(gone).unlink()
    checks = {c.digest: c for c in verify_models(store, blobs)}
    assert (checks[good].status, checks[good].versions, checks[good].size) == ("ok", (1, 4), 4)
    assert checks[bad].status == "corrupt" and not checks[bad].is_ok
    assert (checks[gone].status, checks[gone].size) == ("missing", None)


def test_gc_removes_only_unreferenced_blobs(store: SqlStore, blobs: BlobStore) -> None:
    model = blobs.put_bytes(b"model")
    open_update = blobs.put_bytes(b"update of an open round")
    done_update = blobs.put_bytes(b"update of a committed round")
    orphan = blobs.put_bytes(b"orphan!")
    store.add_model(digest=model, kind="initial", set_head=True)
    done, still_open = store.create_rounds(2)
    for server_round, digest in ((done, done_update), (still_open, open_update)):
        store.set_round_status(server_round, "training")
        store.add_update(
            server_round=server_round, client_id="c1", task_id="t", status="accepted", digest=digest
        )
    store.commit_round(done, digest=model, metrics={}, num_clients=1)
    temp, handle = blobs.temp_file()  # an upload in progress
    handle.close()

    dry = collect_garbage(store, blobs, dry_run=True)
    assert dry.dry_run and sorted(d for d, _ in dry.removed) == sorted([done_update, orphan])
    assert dry.bytes_freed == len(b"update of a committed round") + len(b"orphan!")
    assert blobs.has(orphan) and blobs.has(done_update)

    report = collect_garbage(store, blobs)
    assert report.bytes_freed == dry.bytes_freed and report.kept == 2
    assert set(blobs.digests()) == {model, open_update}
    assert temp.exists()
    assert collect_garbage(store, blobs).removed == ()


def test_stage_file_and_remove(blobs: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "m.bin"
    source.write_bytes(b"weights" * 1000)
    temp, digest = blobs.stage_file(source)
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest() and not blobs.has(digest)
    blobs.commit_temp(temp, digest)
    assert blobs.remove(digest) == 7000 and not blobs.has(digest)
    assert blobs.remove(digest) == 0
    with pytest.raises(NotFoundError):
        blobs.stage_file(tmp_path / "missing")


# -- migration from schema version 1 --------------------------------------------------------

#: A state database written by flctl with schema version 1 (``sqlite3 state.db .dump``).
V1_DUMP = """BEGIN TRANSACTION;
CREATE TABLE clients (
    client_id VARCHAR(255) NOT NULL,
    fingerprint VARCHAR(128) NOT NULL,
    state VARCHAR(32) NOT NULL,
    first_seen FLOAT NOT NULL,
    last_seen FLOAT NOT NULL,
    rounds_joined INTEGER NOT NULL,
    bytes_up BIGINT NOT NULL,
    bytes_down BIGINT NOT NULL,
    PRIMARY KEY (client_id)
);
CREATE TABLE events (
    seq INTEGER NOT NULL,
    time FLOAT NOT NULL,
    type VARCHAR(64) NOT NULL,
    server_round INTEGER NOT NULL,
    client_id VARCHAR(255) NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (seq)
);
INSERT INTO "events" VALUES(1,1700000000.0,'model.created',0,'','{"version": 2}');
CREATE TABLE meta (
    "key" VARCHAR(64) NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY ("key")
);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE models (
    version INTEGER NOT NULL,
    digest VARCHAR(64) NOT NULL,
    parent INTEGER,
    server_round INTEGER,
    kind VARCHAR(16) NOT NULL,
    metrics TEXT NOT NULL,
    created FLOAT NOT NULL,
    PRIMARY KEY (version),
    FOREIGN KEY(parent) REFERENCES models (version)
);
INSERT INTO "models" VALUES(
    1,
    'abababababababababababababababababababababababababababababababab',
    NULL,
    NULL,
    'initial',
    '{"accuracy": 0.1}',
    1700000000.0);
INSERT INTO "models" VALUES(
    2,
    'efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef',
    1,
    1,
    'aggregate',
    '{"accuracy": 0.5}',
    1700000000.0);
CREATE TABLE refs (
    name VARCHAR(64) NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name),
    FOREIGN KEY(version) REFERENCES models (version)
);
INSERT INTO "refs" VALUES('head',2);
CREATE TABLE rounds (
    id INTEGER NOT NULL,
    status VARCHAR(16) NOT NULL,
    created FLOAT NOT NULL,
    started FLOAT,
    ended FLOAT,
    base_version INTEGER,
    model_version INTEGER,
    num_clients INTEGER NOT NULL,
    selected TEXT NOT NULL,
    metrics TEXT NOT NULL,
    reason TEXT NOT NULL,
    deadline FLOAT,
    config TEXT NOT NULL,
    PRIMARY KEY (id)
);
INSERT INTO "rounds" VALUES(
    1,
    'committed',
    1700000000.0,
    NULL,
    1700000000.0,
    NULL,
    2,
    1,
    '[]',
    '{"accuracy": 0.5}',
    '',
    NULL,
    '{"rounds": {"strategy": "fedavg"}, "seed": 0}');
CREATE TABLE updates (
    id INTEGER NOT NULL,
    server_round INTEGER NOT NULL,
    client_id VARCHAR(255) NOT NULL,
    task_id VARCHAR(255) NOT NULL,
    status VARCHAR(16) NOT NULL,
    reason TEXT NOT NULL,
    digest VARCHAR(64) NOT NULL,
    size BIGINT NOT NULL,
    num_examples BIGINT NOT NULL,
    metrics TEXT NOT NULL,
    created FLOAT NOT NULL,
    PRIMARY KEY (id)
);
INSERT INTO "updates" VALUES(
    1,
    1,
    'c1',
    't1',
    'accepted',
    '',
    'cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd',
    10,
    5,
    '{"loss": 1.0}',
    1700000000.0);
CREATE INDEX ix_models_digest ON models (digest);
CREATE INDEX ix_rounds_status ON rounds (status);
CREATE INDEX ix_updates_round_client ON updates (server_round, client_id);
CREATE INDEX ix_events_server_round ON events (server_round);
COMMIT;"""


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.executescript(V1_DUMP)
    conn.close()

    with SqlStore.open(tmp_path) as store:
        v1, v2 = store.get_model(1), store.get_model(2)
        assert (v1.status, v1.author, v1.config, v1.config_hash) == ("ok", "", {}, "")
        assert (v2.status, v2.author, v2.metrics) == ("ok", "round", {"accuracy": 0.5})
        assert v2.config == {"rounds": {"strategy": "fedavg"}, "seed": 0}
        assert (
            v2.config_hash
            == hashlib.sha256(b'{"rounds": {"strategy": "fedavg"}, "seed": 0}').hexdigest()
        )
        head = store.head()
        assert head is not None and head.version == 2
        assert store.updates_for_round(1)[0].client_id == "c1"
        assert store.last_event_seq() == 1
        # the registry works on the migrated database
        store.add_tag(1, "start")
        rollback = store.set_head(1, author="local")
        assert (rollback.version, rollback.source) == (3, 1)

    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SqlStore.SCHEMA_VERSION),)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
        assert {"status", "reason", "author", "source", "config_json", "config_hash"} <= columns
    finally:
        conn.close()
    with SqlStore.open(tmp_path) as store:  # opening again is a no-op
        assert store.tags_for(1) == ["start"]
