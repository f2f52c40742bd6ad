"""The invariants of crash safety, checked on a coordinator's state folder from the outside.

Everything is read without writing: ``state.db`` through :mod:`sqlite3` in read-only mode (a
coordinator may still be running), or a store on PostgreSQL through :mod:`psycopg` in read-only
transactions; the blob store and the uploads folder (in the state folder, or in the shared blob
folder that ``[store] blobs`` names) as plain files. Each invariant is one function that
returns a :class:`Check`; :func:`check_invariants` runs them all.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "READ_ERRORS",
    "RESTART_REASON",
    "Check",
    "KillPoint",
    "StateReader",
    "check_invariants",
]

#: The reason of a round that a restarted coordinator could not resume starts with this.
RESTART_REASON = "coordinator restarted"
#: Round statuses a round never leaves (``rejected``: stored, kept from the head by the gate).
TERMINAL = ("committed", "rejected", "failed", "cancelled")

Event = tuple[int, str, int, str, dict[str, Any]]  # seq, type, round, client, data


def _read_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:  # only a store on PostgreSQL needs it
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


#: What reading a store may raise: :mod:`sqlite3`'s errors, and :mod:`psycopg`'s.
READ_ERRORS = _read_errors()


@dataclass(frozen=True)
class Check:
    """One invariant and whether it held (``detail`` says what broke it)."""

    name: str
    held: bool
    detail: str = ""


@dataclass(frozen=True)
class KillPoint:
    """Where a kill landed: the last event written before it and the round open then."""

    last_seq: int
    server_round: int | None
    phase: str


class StateReader:
    """Reads a coordinator's state without writing anything.

    Args:
        state_dir: The state folder (``.flctl``): ``state.db`` (SQLite, ``mode=ro``), and the
            blobs and uploads unless ``blobs`` names a folder of their own.
        url: ``[store] url`` of a store on PostgreSQL (SQLAlchemy's form,
            ``postgresql+psycopg://...``): its tables are read instead of ``state.db``, on one
            connection in autocommit mode whose transactions are read-only.
        blobs: ``[store] blobs``, the shared blob folder: models under ``<blobs>/sha256``,
            temp files under ``<blobs>/tmp``, part files under ``<blobs>/uploads``.
    """

    def __init__(self, state_dir: Path, url: str = "", blobs: Path | None = None) -> None:
        self.state_dir = state_dir
        self.db = state_dir / "state.db"
        self.url = url
        # where flctl.core.config puts them: beside shared blobs, else in the state folder
        self.blob_root = state_dir / "blobs" if blobs is None else blobs
        self.uploads_dir = state_dir / "uploads" if blobs is None else blobs / "uploads"
        self._pg: Any = None  # psycopg.Connection, opened on the first query

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query, or [] while the database or its tables do not exist yet.

        ``sql`` takes ``?`` placeholders, whichever the database.
        """
        if self.url:
            return self._pg_query(sql, args)
        if not self.db.exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, tuple(args)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # the first coordinator is creating the schema
                return []
            raise
        finally:
            con.close()

    def _pg_query(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        import psycopg

        if args:  # psycopg's placeholders; a literal % is written %% where there are any
            sql = sql.replace("%", "%%").replace("?", "%s")
        for attempt in (1, 2):
            try:
                if self._pg is None:
                    self._pg = psycopg.connect(
                        re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", self.url),
                        autocommit=True,
                        connect_timeout=10,
                        application_name="flctl-chaos-reader",
                        options="-c default_transaction_read_only=on",
                    )
                with self._pg.cursor() as cursor:
                    cursor.execute(sql, tuple(args) if args else None)
                    return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
            except psycopg.errors.UndefinedTable:  # the first coordinator is creating the schema
                return []
            except psycopg.OperationalError:  # the connection was lost: once more, on a new one
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the database connection, if one is open (a later query opens another)."""
        connection, self._pg = self._pg, None
        if connection is not None:
            connection.close()

    def events_after(self, seq: int) -> list[Event]:
        """Events with a higher seq, in order: (seq, type, round, client, data)."""
        return [
            (int(s), str(t), int(r), str(c), _loads(d))
            for s, t, r, c, d in self.query(
                "SELECT seq, type, server_round, client_id, data FROM events "
                "WHERE seq > ? ORDER BY seq",
                (seq,),
            )
        ]

    def last_seq(self) -> int:
        """The last event's seq (0 when none)."""
        rows = self.query("SELECT MAX(seq) FROM events")
        return int(rows[0][0] or 0) if rows else 0

    def leaders(self) -> list[dict[str, Any]]:
        """Who led in each epoch, oldest first (PostgreSQL: one row per take-over)."""
        return [
            {
                "epoch": int(e),
                "address": str(a),
                "pid": int(p),
                "since": float(s),
                "ended": None if n is None else float(n),
                "end_reason": str(r or ""),
            }
            for e, a, p, s, n, r in self.query(
                "SELECT epoch, address, pid, since, ended, end_reason FROM leaders ORDER BY epoch"
            )
        ]

    def open_round(self) -> tuple[int, str] | None:
        """The round past ``queued`` and not yet terminal, if any: (id, status)."""
        done = ", ".join(f"'{s}'" for s in ("queued", *TERMINAL))
        rows = self.query(f"SELECT id, status FROM rounds WHERE status NOT IN ({done}) ORDER BY id")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def all_terminal(self, count: int) -> bool:
        """Whether at least ``count`` rounds exist and every round is terminal."""
        rows = self.query("SELECT status FROM rounds")
        return len(rows) >= count and all(r[0] in TERMINAL for r in rows)

    def rounds(self) -> list[dict[str, Any]]:
        """Every round: id, status, reason, and whether a coordinator resumed it."""
        resumed = {
            int(r)
            for (r,) in self.query(
                "SELECT DISTINCT server_round FROM events WHERE type = 'round.resumed'"
            )
        }
        return [
            {"id": int(i), "status": str(s), "reason": str(why or ""), "resumed": i in resumed}
            for i, s, why in self.query("SELECT id, status, reason FROM rounds ORDER BY id")
        ]

    def blob_path(self, digest: str) -> Path:
        """Where the blob store keeps ``digest``."""
        return self.blob_root / "sha256" / digest[:2] / digest[2:]

    def blob_problem(self, digest: str) -> str:
        """What is wrong with blob ``digest`` ("" when it exists and hashes to its name)."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest or ""):
            return f"malformed digest {digest!r}"
        path = self.blob_path(digest)
        if not path.is_file():
            return f"blob {digest[:12]} is missing"
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != digest:
            return f"blob {digest[:12]} hashes to {sha.hexdigest()[:12]}"
        return ""

    def blob_digests(self) -> set[str]:
        """Every blob in the store."""
        root = self.blob_root / "sha256"
        return {p.parent.name + p.name for p in root.glob("*/*") if p.is_file()}

    def parts(self) -> dict[str, int]:
        """Part files under ``uploads/`` and their sizes."""
        return {p.name: _size(p) for p in _files(self.uploads_dir) if p.suffix == ".part"}

    def uploads_in_flight(self) -> int:
        """Part files that hold bytes under ``uploads/``."""
        return sum(1 for size in self.parts().values() if size)

    def temp_blobs(self) -> int:
        """Files under ``blobs/tmp``."""
        return len(_files(self.blob_root / "tmp"))

    def orphan_blobs(self) -> int:
        """Blobs no model and no accepted update names (harmless: content-addressed)."""
        named = {d for (d,) in self.query("SELECT digest FROM models")}
        named |= {d for (d,) in self.query("SELECT digest FROM updates WHERE digest != ''")}
        return len(self.blob_digests() - named)


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except FileNotFoundError:
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _loads(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _check(name: str, problems: Sequence[str]) -> Check:
    shown = "; ".join(problems[:5])
    if len(problems) > 5:
        shown += f"; and {len(problems) - 5} more"
    return Check(name, not problems, shown)


# ---------------------------------------------------------------------- the invariants


def check_invariants(
    reader: StateReader,
    *,
    rounds: int,
    acknowledged: Mapping[str, set[int]],
    kills: Sequence[KillPoint],
    clients_alive: Mapping[str, bool],
    epochs: int | None = None,
) -> list[Check]:
    """Check crash safety on a coordinator's state once every round ended and it stopped.

    Args:
        reader: The state folder.
        rounds: How many rounds the job queued.
        acknowledged: Per client id, the rounds whose update it was told was accepted.
        kills: Where each kill landed.
        clients_alive: Per client id, whether its process still ran when the rounds ended.
        epochs: On a store on PostgreSQL, how many leaders there were (the kills that landed,
            plus one): adds the two checks of the leadership. None: not checked.

    Returns:
        One :class:`Check` per invariant, in this order:

        - ``acknowledged_updates_recorded``: every ``update.accepted`` event and every
          acceptance a client printed has an accepted row in ``updates`` (the same digest),
          and no client has two accepted updates in one round (none is counted twice);
        - ``update_blobs_intact``: every accepted update's blob exists and hashes to its digest;
        - ``models_intact``: every model version's blob hashes to its digest, and every
          committed (or rejected) round names an aggregate of that round;
        - ``head_is_last_version``: ``head`` is the newest version, and the last committed
          round's aggregate unless a rollback came after it;
        - ``rounds_start_from_head``: every round that trained started from the head of its
          time (the newest version written before it, rejected ones aside), and every
          aggregate's parent is its round's base;
        - ``no_open_round``: every queued round ended (committed, rejected, failed or
          cancelled);
        - ``open_round_resumed_or_failed``: a round open at a kill was next resumed, or failed
          with a reason that starts with "coordinator restarted";
        - ``event_log_complete``: the event log is gap-free and records every state change
          the tables hold: each accepted update (``update.accepted``), each model version
          (``model.created``, ``model.rejected``, ``model.rollback`` or ``model.imported``) and
          each ended round (``round.<its status>``);
        - ``deferred_rollbacks_resolved``: every rollback that was deferred until the end of a
          running round (``model.rollback_deferred``) was then applied or failed;
        - ``no_partial_files``: ``uploads/`` and ``blobs/tmp/`` are empty and no ``*.tmp`` or
          ``*.part`` file is left in the state folder;
        - ``clients_stayed``: every client process still runs (they reconnect by themselves);

        and with ``epochs``:

        - ``epochs_increase``: ``leaders`` holds epochs 1 to ``epochs``, one row each, and every
          epoch but the last ended (the next leader took over, or it stepped down);
        - ``one_writer_per_epoch``: in seq order, the events' epoch never goes down, each is an
          epoch of ``leaders``, and none was written after its epoch ended (an old leader that
          wrote after a take-over breaks it).
    """
    events = reader.events_after(0)
    accepted = {
        (int(r), str(c)): str(d)
        for r, c, d in reader.query(
            "SELECT server_round, client_id, digest FROM updates WHERE status = 'accepted'"
        )
    }
    models = {
        int(v): {
            "digest": str(d),
            "parent": p,
            "round": r,
            "kind": str(k),
            "status": str(s),
            "created": float(c),
        }
        for v, d, p, r, k, s, c in reader.query(
            "SELECT version, digest, parent, server_round, kind, status, created FROM models"
        )
    }
    round_rows = [
        {"id": int(i), "status": str(s), "base": b, "version": m, "started": t}
        for i, s, b, m, t in reader.query(
            "SELECT id, status, base_version, model_version, started FROM rounds ORDER BY id"
        )
    ]
    head_rows = reader.query("SELECT version FROM refs WHERE name = 'head'")
    head = int(head_rows[0][0]) if head_rows else None
    twice = reader.query(
        "SELECT server_round, client_id FROM updates WHERE status = 'accepted' "
        "GROUP BY server_round, client_id HAVING COUNT(*) > 1"
    )
    checks = [
        _acknowledged(events, accepted, acknowledged, twice),
        _check(
            "update_blobs_intact",
            [
                f"round {r} {c}: {why}"
                for (r, c), digest in sorted(accepted.items())
                if (why := reader.blob_problem(digest))
            ],
        ),
        _models_intact(reader, models, round_rows),
        _head(head, models, round_rows),
        _lineage(models, round_rows),
        _check(
            "no_open_round",
            [f"round {r['id']} is {r['status']}" for r in round_rows if r["status"] not in TERMINAL]
            + ([f"{len(round_rows)} of {rounds} rounds exist"] if len(round_rows) < rounds else []),
        ),
        _resumed_or_failed(events, kills),
        _event_log(events, accepted, models, round_rows),
        _deferred_rollbacks(events),
        _check("no_partial_files", _partial_files(reader)),
        _check(
            "clients_stayed",
            [f"{c} exited" for c, alive in sorted(clients_alive.items()) if not alive],
        ),
    ]
    if epochs is not None:
        leaders = reader.leaders()
        checks += [_epochs_increase(leaders, epochs), _one_writer_per_epoch(reader, leaders)]
    return checks


def _acknowledged(
    events: list[Event],
    accepted: Mapping[tuple[int, str], str],
    acknowledged: Mapping[str, set[int]],
    twice: list[tuple[Any, ...]],
) -> Check:
    problems = [f"{c} has two accepted updates in round {r}" for r, c in twice]
    for _, kind, server_round, client, data in events:
        if kind != "update.accepted":
            continue
        digest = accepted.get((server_round, client))
        if digest is None:
            problems.append(f"update.accepted of {client} in round {server_round}: no row")
        elif digest != data.get("digest"):
            problems.append(f"update.accepted of {client} in round {server_round}: digest differs")
    for client, told in sorted(acknowledged.items()):
        problems += [
            f"{client} was told its round {r} update was accepted: no row"
            for r in sorted(told)
            if (r, client) not in accepted
        ]
    return _check("acknowledged_updates_recorded", problems)


def _models_intact(
    reader: StateReader, models: Mapping[int, dict[str, Any]], round_rows: list[dict[str, Any]]
) -> Check:
    problems = [
        f"version {v}: {why}"
        for v, m in sorted(models.items())
        if (why := reader.blob_problem(m["digest"]))
    ]
    for r in round_rows:
        if r["status"] not in ("committed", "rejected"):
            continue
        model = models.get(r["version"])
        if model is None or model["round"] != r["id"] or model["kind"] != "aggregate":
            problems.append(f"{r['status']} round {r['id']} names version {r['version']}")
    return _check("models_intact", problems)


def _head(
    head: int | None, models: Mapping[int, dict[str, Any]], round_rows: list[dict[str, Any]]
) -> Check:
    ok = [v for v, m in models.items() if m["status"] == "ok"]
    problems = []
    if head is None or not ok or head != max(ok):
        problems.append(f"head is version {head}, the newest is {max(ok) if ok else None}")
    committed = [r["version"] for r in round_rows if r["status"] == "committed"]
    kind = models[head]["kind"] if head is not None and head in models else None
    if kind == "aggregate" and committed[-1:] != [head]:
        problems.append(f"head is version {head}, the last committed round's is {committed[-1:]}")
    return _check("head_is_last_version", problems)


def _lineage(models: Mapping[int, dict[str, Any]], round_rows: list[dict[str, Any]]) -> Check:
    # Every new version that is not rejected becomes the head, and nothing moves the head while
    # a round runs (a rollback asked meanwhile waits for the round's end): the head a round
    # starts from is the newest such version written before it started.
    problems = []
    for r in round_rows:
        if r["base"] is None:
            continue
        head = max(
            (v for v, m in models.items() if m["status"] == "ok" and m["created"] <= r["started"]),
            default=None,
        )
        if r["base"] != head:
            problems.append(f"round {r['id']} started from version {r['base']}, head {head}")
        if r["status"] in ("committed", "rejected") and r["version"] in models:
            parent = models[r["version"]]["parent"]
            if parent != r["base"]:
                problems.append(
                    f"round {r['id']}'s version {r['version']} has parent {parent}, "
                    f"its base is {r['base']}"
                )
    return _check("rounds_start_from_head", problems)


def _resumed_or_failed(events: list[Event], kills: Sequence[KillPoint]) -> Check:
    outcomes = ("round.resumed", *(f"round.{s}" for s in TERMINAL))
    problems = []
    for kill in kills:
        if kill.server_round is None:
            continue
        outcome = next(
            (
                (kind, data)
                for seq, kind, server_round, _, data in events
                if seq > kill.last_seq and server_round == kill.server_round and kind in outcomes
            ),
            None,
        )
        what = f"round {kill.server_round} (killed while {kill.phase})"
        if outcome is None:
            problems.append(f"{what}: neither resumed nor failed")
        elif outcome[0] not in ("round.resumed", "round.failed"):
            problems.append(f"{what}: {outcome[0]} without being resumed")
        elif outcome[0] == "round.failed":
            reason = str(outcome[1].get("reason", ""))
            if not reason.startswith(RESTART_REASON):
                problems.append(f"{what}: failed at restart with {reason!r}")
    return _check("open_round_resumed_or_failed", problems)


def _event_log(
    events: list[Event],
    accepted: Mapping[tuple[int, str], str],
    models: Mapping[int, dict[str, Any]],
    round_rows: list[dict[str, Any]],
) -> Check:
    seqs = [e[0] for e in events]
    problems = [] if seqs == list(range(1, len(seqs) + 1)) else ["event seqs have gaps"]
    logged_updates = {(r, c) for _, kind, r, c, _ in events if kind == "update.accepted"}
    problems += [
        f"the accepted update of {c} in round {r} has no update.accepted event"
        for r, c in sorted(accepted)
        if (r, c) not in logged_updates
    ]
    model_kinds = ("model.created", "model.rejected", "model.rollback", "model.imported")
    logged_models = {d.get("version") for _, kind, _, _, d in events if kind in model_kinds}
    problems += [
        f"version {v} has no model event" for v in sorted(models) if v not in logged_models
    ]
    ended = {(r, kind.removeprefix("round.")) for _, kind, r, _, _ in events}
    problems += [
        f"round {r['id']} is {r['status']} without a round.{r['status']} event"
        for r in round_rows
        if r["status"] in TERMINAL and (r["id"], r["status"]) not in ended
    ]
    return _check("event_log_complete", problems)


def _deferred_rollbacks(events: list[Event]) -> Check:
    problems = []
    for seq, kind, _, _, data in events:
        if kind != "model.rollback_deferred":
            continue
        source = data.get("source")
        if not any(
            later > seq
            and other in ("model.rollback", "model.rollback_failed")
            and details.get("source") == source
            for later, other, _, _, details in events
        ):
            problems.append(
                f"the rollback to version {source} deferred until round "
                f"{data.get('server_round')} ended was neither applied nor failed"
            )
    return _check("deferred_rollbacks_resolved", problems)


def _epochs_increase(leaders: list[dict[str, Any]], expected: int) -> Check:
    got = [x["epoch"] for x in leaders]
    problems = []
    if got != list(range(1, expected + 1)):
        problems.append(f"the leaders' epochs are {got}, not 1 to {expected}")
    problems += [
        f"epoch {x['epoch']} ({x['address']}, pid {x['pid']}) never ended, "
        f"though epoch {x['epoch'] + 1} followed"
        for x in leaders[:-1]
        if x["ended"] is None
    ]
    return _check("epochs_increase", problems)


def _one_writer_per_epoch(reader: StateReader, leaders: list[dict[str, Any]]) -> Check:
    by_epoch = {x["epoch"]: x for x in leaders}
    problems = []
    newest = 0
    for seq, epoch, written in reader.query("SELECT seq, epoch, time FROM events ORDER BY seq"):
        seq, epoch, written = int(seq), int(epoch), float(written)
        leader = by_epoch.get(epoch)
        if epoch < newest:
            problems.append(f"event {seq} was written in epoch {epoch}, after epoch {newest}")
        if leader is None:
            problems.append(f"event {seq} was written in epoch {epoch}, which had no leader")
        elif leader["ended"] is not None and written > leader["ended"]:
            problems.append(
                f"event {seq} of epoch {epoch} was written {written - leader['ended']:.3f} s "
                f"after that epoch ended ({leader['end_reason'] or 'no reason'})"
            )
        newest = max(newest, epoch)
    return _check("one_writer_per_epoch", problems)


def _partial_files(reader: StateReader) -> list[str]:
    holders = (reader.uploads_dir, reader.blob_root / "tmp")
    roots = [reader.state_dir]
    if not reader.blob_root.is_relative_to(reader.state_dir):  # a shared blob folder
        roots.append(reader.blob_root)
    return sorted(
        str(p.relative_to(root if root == reader.state_dir else root.parent))
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and (p.parent in holders or p.suffix in (".tmp", ".part"))
    )
