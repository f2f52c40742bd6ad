"""``flctl models``: the model registry, read and written straight from the state store.

Reading commands (``ls``, ``show``, ``diff``, ``export``, ``verify``, ``gc --dry-run``) work
whether or not a coordinator runs. Commands that change the store take the coordinator's lock
(``.flctl/coordinator.lock``) without waiting. While a coordinator holds it, ``rollback`` and
``tag`` go through its Admin service (serialised with its rounds, recorded with the admin's
identity); ``import`` and ``gc`` refuse. torch, safetensors and sqlmodel are imported inside
the commands that need them, so ``import flctl.cli`` stays light.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flctl.cli._options import ConfigOpt, JsonOpt, ServerOpt
from flctl.cli._output import Output, command
from flctl.core import Config
from flctl.core.errors import (
    ConflictError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
)

if TYPE_CHECKING:
    from flctl.store import BlobStore, ModelRecord, SqlStore

__all__ = ["list_models", "model_dict", "models_app"]

models_app = typer.Typer(help="The model history in the state store.", no_args_is_help=True)

#: The author recorded for changes made by these commands without a coordinator.
LOCAL_AUTHOR = "local"

RefArg = Annotated[
    str, typer.Argument(help="A version number, a tag, `head`, or a digest prefix (6+ hex).")
]


class ExportFormat(enum.StrEnum):
    """File formats ``models export`` writes."""

    safetensors = "safetensors"
    torch = "torch"


# ---------------------------------------------------------------------- shared plumbing


def model_dict(record: ModelRecord, head: int | None, tags: Sequence[str] = ()) -> dict[str, Any]:
    """A model version as the JSON object the ``models`` commands print."""
    return {
        "version": record.version,
        "digest": record.digest,
        "parent": record.parent,
        "round": record.server_round,
        "kind": record.kind,
        "status": record.status,
        "reason": record.reason,
        "author": record.author,
        "source": record.source,
        "metrics": record.metrics,
        "config_hash": record.config_hash,
        "tags": list(tags),
        "created": record.created,
        "is_head": record.version == head,
    }


@contextmanager
def _open_state(
    config: Config, *, write: bool = False, deep_check: bool = False
) -> Iterator[tuple[SqlStore, BlobStore]]:
    """The project's database and blob store; never creates (nor, unless ``write``, changes) it.

    Raises:
        NotFoundError: The state folder never held a store.
        StoreLostError: Its database is missing or empty although it held one.
        CorruptStoreError: The database is damaged.
    """
    from flctl.store import BlobStore, open_store, require_state

    require_state(config)
    store = open_store(config, read_only=not write, deep_check=deep_check, offline="flctl models")
    try:
        yield store, BlobStore(config.blobs_path)
    finally:
        store.close()


@contextmanager
def _lock_or_running(config: Config, command: str) -> Iterator[dict[str, Any] | None]:
    """:func:`flctl.cli._common.lock_or_running` on the project's existing state store.

    Raises:
        NotFoundError: There is no state store yet.
    """
    from flctl.cli._common import lock_or_running
    from flctl.store import require_state

    require_state(config)
    with lock_or_running(config.state_path, command) as running:
        yield running


@contextmanager
def _offline_lock(config: Config, command: str) -> Iterator[None]:
    """Hold the state folder for a change that cannot go through a coordinator, or refuse.

    Raises:
        ConflictError: A coordinator is running.
    """
    from flctl.cli._common import refuse_running

    with _lock_or_running(config, command) as running:
        if running is not None:
            raise refuse_running(
                running,
                "this change must go through it",
                "stop the coordinator to change the store directly",
            )
        yield


def _tags_by_version(store: SqlStore) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for tag in store.list_tags():
        out.setdefault(tag.version, []).append(tag.name)
    return out


def _head_version(store: SqlStore) -> int | None:
    head = store.head()
    return None if head is None else head.version


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _finite(value: float) -> float | None:
    """A number JSON can carry: NaN and infinities become null."""
    return value if math.isfinite(value) else None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _flat(values: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested config as ``(dotted.key, value)`` rows, leaves in key order."""
    if isinstance(values, dict):
        for key in sorted(values):
            yield from _flat(values[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(values, list | tuple):
        yield prefix, ", ".join(str(v) for v in values) or "-"
    else:
        yield prefix, str(values)


def _existing_blob(blobs: BlobStore, model: ModelRecord) -> Path:
    path = blobs.path(model.digest)
    if not path.is_file():
        raise NotFoundError(
            f"the weights of version {model.version} (blob {model.digest[:12]}) are missing",
            hint="run `flctl models verify` to check every version",
        )
    return path


# ---------------------------------------------------------------------- ls


def list_models(
    config: Config, *, limit: int | None, json_output: bool, include_rejected: bool = False
) -> dict[str, Any]:
    """Print the model versions, newest first; works whether or not a coordinator runs."""
    out = Output(json_mode=json_output)
    with _open_state(config) as (store, _):
        head = _head_version(store)
        models = store.list_models(limit=limit, include_rejected=include_rejected)
        tags = _tags_by_version(store)
    document = {
        "models": [model_dict(m, head, tags.get(m.version, ())) for m in models],
        "head": head,
    }
    if json_output:
        out.json(document)
        return document
    metric_names = sorted({k for m in models for k in m.metrics})[:4]
    # below 100 columns, a terminal leaves out the creation time
    is_wide = not out.is_terminal or out.console.width >= 100
    columns = ["version", "digest", "parent", "round", "kind", "tags", *metric_names]
    rows = []
    for m in models:
        kind = m.kind if m.source is None else f"{m.kind} of {m.source}"
        if m.version == head:
            kind += " (head)"
        if m.status != "ok":
            kind += f" ({m.status})"
        rows.append(
            [
                str(m.version),
                m.digest[:12],
                str(m.parent or "-"),
                str(m.server_round or "-"),
                kind,
                ", ".join(tags.get(m.version, ())) or "-",
                *[f"{m.metrics[k]:.4f}" if k in m.metrics else "-" for k in metric_names],
                *([_when(m.created)] if is_wide else []),
            ]
        )
    out.table(
        [*columns, "created"] if is_wide else columns,
        rows,
        title=f"models in {config.state_path}",
        right=["version", "parent", "round", *metric_names],
    )
    return document


@models_app.command("ls")
@command()
def models_ls(
    limit: Annotated[int | None, typer.Option(help="Show at most this many versions.")] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Include versions the validation gate rejected.")
    ] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List model versions, newest first.

    Works with or without a running coordinator.
    """
    from flctl.cli._common import load_project

    list_models(
        load_project(config_path),
        limit=limit,
        json_output=json_output,
        include_rejected=show_all,
    )


# ---------------------------------------------------------------------- show


def _tensor_summary(path: Path) -> dict[str, Any]:
    from flctl.tensors import read_spec

    specs = read_spec(path)
    dtypes: dict[str, int] = {}
    for spec in specs.values():
        dtypes[spec.dtype] = dtypes.get(spec.dtype, 0) + 1
    return {
        "count": len(specs),
        "parameters": sum(spec.numel for spec in specs.values()),
        "dtypes": dict(sorted(dtypes.items())),
    }


def _state_summary(blobs: BlobStore, digest: str) -> dict[str, Any] | None:
    """The strategy state recorded with a version: its blob and tensors; None: it has none."""
    if not digest:
        return None
    from flctl.tensors import read_spec

    path = blobs.path(digest)
    doc: dict[str, Any] = {"digest": digest, "blob": "missing", "tensors": None}
    if not path.is_file():
        return doc
    try:
        specs = read_spec(path)
    except InvalidInputError:
        doc["blob"] = "unreadable"
        return doc
    doc["blob"] = "present"
    doc["size_bytes"] = path.stat().st_size
    doc["tensors"] = [
        {
            "name": spec.name,
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "bytes": spec.end - spec.begin,
        }
        for spec in sorted(specs.values(), key=lambda spec: spec.name)
    ]
    return doc


def show_model(config: Config, ref: str) -> dict[str, Any]:
    """Everything the registry knows about one version, as ``models show --json`` prints it."""
    with _open_state(config) as (store, blobs):
        model = store.resolve_model(ref)
        head = _head_version(store)
        lineage = store.lineage(model.version)
        tags = store.tags_for(model.version)
        round_doc: dict[str, Any] | None = None
        # A rollback restores weights that a round produced: show that round.
        server_round = model.server_round
        if server_round is None and model.source is not None:
            server_round = store.get_model(model.source).server_round
        if server_round is not None:
            try:
                rnd = store.get_round(server_round)
            except NotFoundError:
                rnd = None
            if rnd is not None:
                updates = store.updates_for_round(rnd.id)
                round_doc = {
                    "round": rnd.id,
                    "status": rnd.status,
                    "num_clients": rnd.num_clients,
                    "metrics": rnd.metrics,
                    "duration_s": rnd.duration_s,
                    "contributors": [
                        {
                            "client_id": u.client_id,
                            "num_examples": u.num_examples,
                            "metrics": u.metrics,
                            "digest": u.digest,
                            # Byzantine detection: null scores for an update never scored
                            "scores": u.scores,
                            "outlier": u.outlier,
                            "excluded": u.is_excluded,
                        }
                        for u in updates
                        if u.status == "accepted"
                    ],
                    "rejected_updates": [
                        {"client_id": u.client_id, "reason": u.reason}
                        for u in updates
                        if u.status == "rejected"
                    ],
                }
        path = blobs.path(model.digest)
        present = path.is_file()
    tensors: dict[str, Any] | None = None
    blob_state = "present" if present else "missing"
    if present:
        try:
            tensors = _tensor_summary(path)
        except InvalidInputError:
            blob_state = "unreadable"  # a damaged header; `models verify` says more
    config_doc = model.config
    strategy = _strategy_name(config_doc)
    strategy_state = _state_summary(blobs, model.state_digest)
    return {
        "model": model_dict(model, head, tags),
        "lineage": [
            {
                "version": m.version,
                "digest": m.digest,
                "kind": m.kind,
                "round": m.server_round,
                "parent": m.parent,
            }
            for m in lineage
        ],
        "round": round_doc,
        "strategy": strategy,
        "strategy_state": strategy_state,
        "config": config_doc,
        # the round that made it ran [secagg]: the coordinator only ever held its sum
        "secure_aggregation": _secure_aggregation(config_doc),
        "config_hash": model.config_hash,
        "tensors": tensors,
        "size_bytes": path.stat().st_size if present else None,
        "blob": blob_state,
    }


def _round_rows(rnd: dict[str, Any]) -> list[tuple[str, str]]:
    """The round that made a version, and a line per contributor (scores, outlier marks)."""
    from flctl.cli._scores import SCORE_COLUMNS, outlier_mark, score_cells

    contributors = rnd["contributors"]
    excluded = sum(bool(c["excluded"]) for c in contributors)
    flagged = sum(bool(c["outlier"]) for c in contributors) - excluded
    head = f"{rnd['round']} {rnd['status']}, {len(contributors)} contributors"
    rejected = len(rnd["rejected_updates"])
    for count, what in ((excluded, "excluded"), (flagged, "flagged"), (rejected, "rejected")):
        if count:
            head += f", {count} {what}"
    rows = [("round", head)]
    for c in contributors:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(c["metrics"].items()))
        line = f"{c['num_examples']} examples {metrics}".strip()
        if c["scores"] is not None:
            cells = score_cells(c)
            line += "; " + " ".join(f"{k} {v}" for k, v in zip(SCORE_COLUMNS, cells, strict=True))
        mark = outlier_mark(c)
        if mark:
            line += f"; {mark}"
        rows.append((f"  {c['client_id']}", line))
    return rows


def _secure_aggregation(config_doc: dict[str, Any]) -> dict[str, Any] | None:
    """The ``[secagg]`` settings a version's round ran with, or None without secure aggregation."""
    section = config_doc.get("secagg")
    if isinstance(section, dict) and section.get("enabled"):
        return dict(section)
    return None


def _strategy_name(config_doc: dict[str, Any]) -> str | None:
    """The strategy a version was made with (older versions: the deprecated rounds.strategy)."""
    for table, key in (("strategy", "name"), ("rounds", "strategy")):
        section = config_doc.get(table)
        if isinstance(section, dict) and isinstance(section.get(key), str):
            return str(section[key])
    return None


@models_app.command("show")
@command()
def models_show(ref: RefArg, config_path: ConfigOpt = None, json_output: JsonOpt = False) -> None:
    """Show one version in detail.

    Its lineage, the round and clients that made it, config, tensors and size.
    """
    from flctl.cli._common import load_project

    doc = show_model(load_project(config_path), ref)
    out = Output(json_mode=json_output)
    if json_output:
        out.json(doc)
        return
    m = doc["model"]
    kind = m["kind"] if m["source"] is None else f"{m['kind']} of version {m['source']}"
    rows = [
        ("digest", m["digest"]),
        ("kind", kind + (" (head)" if m["is_head"] else "")),
        ("status", m["status"] + (f" ({m['reason']})" if m["reason"] else "")),
        ("author", m["author"] or "-"),
        ("created", _when(m["created"])),
        ("tags", ", ".join(m["tags"]) or "-"),
        ("metrics", " ".join(f"{k}={v:.4f}" for k, v in sorted(m["metrics"].items())) or "-"),
        ("lineage", " <- ".join(f"{x['version']} ({x['kind']})" for x in doc["lineage"])),
    ]
    tensors = doc["tensors"]
    if tensors is None:
        rows.append(("weights", f"{doc['blob']} (run `flctl models verify`)"))
    else:
        rows.append(("tensors", f"{tensors['count']} ({tensors['parameters']:,} parameters)"))
        rows.append(("size", _bytes(doc["size_bytes"])))
    rows.append(("strategy", doc["strategy"] or "-"))
    secure = doc["secure_aggregation"]
    if secure is not None:
        shares = secure.get("num_shares") or "all"
        rows.append(
            (
                "aggregation",
                f"secure (SecAgg+: threshold {secure.get('threshold')}, {shares} neighbours, "
                f"{secure.get('quantization_bits')} bits): no update was seen alone",
            )
        )
    state = doc["strategy_state"]
    if state is not None:
        if state["tensors"] is None:
            rows.append(("strategy state", f"{state['digest'][:12]} ({state['blob']})"))
        else:
            rows.append(
                (
                    "strategy state",
                    f"{state['digest'][:12]}, {len(state['tensors'])} tensors, "
                    f"{_bytes(state['size_bytes'])}",
                )
            )
            for t in state["tensors"]:
                shape = "x".join(str(d) for d in t["shape"]) or "scalar"
                rows.append((f"  {t['name']}", f"{t['dtype']} {shape} ({_bytes(t['bytes'])})"))
    if doc["config_hash"]:
        rows.append(("config", f"sha256 {doc['config_hash'][:12]}"))
    rnd = doc["round"]
    if rnd is not None:
        rows.extend(_round_rows(rnd))
    out.pairs(rows, title=f"model version {m['version']}")
    if doc["config_hash"]:
        out.pairs(_flat(doc["config"], "config"), title=f"config of version {m['version']}")


# ---------------------------------------------------------------------- diff


def diff_models(config: Config, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Compare two versions, as ``models diff --json`` prints it (B relative to A)."""
    with _open_state(config) as (store, blobs):
        a, b = store.resolve_model(ref_a), store.resolve_model(ref_b)
        path_a, path_b = _existing_blob(blobs, a), _existing_blob(blobs, b)
        from flctl.tensors import diff_tensors

        doc = diff_tensors(path_a, path_b, same=a.digest == b.digest)
    metrics: dict[str, dict[str, float | None]] = {}
    for name in sorted(set(a.metrics) | set(b.metrics)):
        va, vb = a.metrics.get(name), b.metrics.get(name)
        delta = None if va is None or vb is None else _finite(vb - va)
        metrics[name] = {"a": va, "b": vb, "delta": delta}
    return {
        "a": {"version": a.version, "digest": a.digest},
        "b": {"version": b.version, "digest": b.digest},
        "same_digest": a.digest == b.digest,
        **doc,
        "metrics": metrics,
    }


@models_app.command("diff")
@command()
def models_diff(
    ref_a: Annotated[str, typer.Argument(metavar="A", help="The version to compare from.")],
    ref_b: Annotated[str, typer.Argument(metavar="B", help="The version to compare to.")],
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Compare the weights of two versions.

    Per-tensor L2 distance, relative change and max abs difference of B against A.
    """
    from flctl.cli._common import load_project

    doc = diff_models(load_project(config_path), ref_a, ref_b)
    out = Output(json_mode=json_output)
    if json_output:
        out.json(doc)
        return
    title = f"version {doc['b']['version']} against version {doc['a']['version']}"
    if doc["same_digest"]:
        title += " (identical weights)"
    out.table(
        ["tensor", "shape", "l2", "relative", "max abs"],
        [
            [
                t["name"],
                "x".join(map(str, t["shape"])) or "scalar",
                _fmt(t["l2"]),
                _fmt(t["relative"]),
                _fmt(t["max_abs"]),
            ]
            for t in doc["tensors"]
        ],
        title=title,
        right=["l2", "relative", "max abs"],
    )
    total = doc["total"]
    out.line(
        f"total: l2={_fmt(total['l2'])} relative={_fmt(total['relative'])} "
        f"max_abs={_fmt(total['max_abs'])}"
    )
    for side in ("a", "b"):
        if doc[f"only_in_{side}"]:
            out.line(f"only in {side.upper()}: {', '.join(doc[f'only_in_{side}'])}")
    for name, m in doc["metrics"].items():
        delta = "" if m["delta"] is None else f" ({m['delta']:+.4f})"
        out.line(f"{name}: {_fmt(m['a'], '.4f')} -> {_fmt(m['b'], '.4f')}{delta}")


# ---------------------------------------------------------------------- rollback / tag


@models_app.command("rollback")
@command()
def models_rollback(
    ref: RefArg,
    reason: Annotated[str, typer.Option(help="Why, kept in the history.")] = "",
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Make an earlier version the head again.

    Its weights become a new version (kind rollback).

    Nothing is deleted; the next round starts from the new head. While a coordinator runs, the
    rollback goes through it: a rollback asked during a round takes effect when that round ends.
    """
    from flctl.cli._common import load_project

    config = load_project(config_path)
    if server:  # a coordinator elsewhere (or the leader of several): through it
        _rollback_online(config, ref, reason, json_output, server)
        return
    with _lock_or_running(config, "models rollback") as running:
        if running is not None:
            _rollback_online(config, ref, reason, json_output)
            return
        _rollback_offline(config, ref, reason, json_output)


def _rollback_offline(config: Config, ref: str, reason: str, json_output: bool) -> None:
    from flctl.core.events import MODEL_ROLLBACK

    with _open_state(config, write=True) as (store, blobs):
        target = store.resolve_model(ref)
        path = _existing_blob(blobs, target)
        if not blobs.verify(target.digest):
            raise IntegrityError(
                f"the weights of version {target.version} are corrupt (blob {path})",
                hint="run `flctl models verify`; roll back to an intact version",
            )
        with store.transaction():  # the new head and its event, or neither
            previous = _head_version(store)
            new = store.set_head(target.version, author=LOCAL_AUTHOR, reason=reason)
            store.append_event(
                MODEL_ROLLBACK,
                data={
                    "version": new.version,
                    "digest": new.digest,
                    "source": target.version,
                    "previous_head": previous,
                    "author": LOCAL_AUTHOR,
                    "reason": reason,
                },
            )
        tags = store.tags_for(new.version)
    _print_rollback(Output(json_mode=json_output), new, tags, target.version, previous)


def _print_rollback(
    out: Output, new: ModelRecord, tags: Sequence[str], source: int, previous: int | None
) -> None:
    if out.json_mode:
        out.json(
            {
                "model": model_dict(new, new.version, tags),
                "source": source,
                "previous_head": previous,
                "deferred": False,
            }
        )
        return
    out.line(
        f"rolled back to version {source}: head is now version {new.version} "
        f"(kind rollback, digest {new.digest[:12]}, was version {previous}); "
        "the next round starts from it"
    )


def _rollback_online(
    config: Config, ref: str, reason: str, json_output: bool, server: str | None = None
) -> None:
    """Roll back through the running coordinator (serialised with its rounds)."""
    from flctl.cli._common import call_admin
    from flctl.transport.grpc import AdminClient

    async def call(client: AdminClient) -> Any:
        return await client.rollback(ref, reason=reason)

    reply = call_admin(config, server, call)
    out = Output(json_mode=json_output)
    if reply.deferred:
        server_round = int(reply.server_round)
        if json_output:
            out.json(
                {
                    "model": None,
                    "source": int(reply.source_version),
                    "previous_head": None,
                    "deferred": True,
                    "round": server_round,
                    "digest": reply.digest,
                    "message": reply.message,
                }
            )
            return
        out.line(
            f"rollback to version {reply.source_version} deferred until round {server_round} "
            f"ends: the coordinator applies it then, before the next round starts "
            f"(digest {reply.digest[:12]})"
        )
        return
    try:
        with _open_state(config) as (store, _):
            new = store.get_model(int(reply.version))
            tags = store.tags_for(new.version)
    except FlctlError:  # the coordinator's store is not readable from here (--server)
        if json_output:
            out.json({"version": int(reply.version), "source": int(reply.source_version)})
        else:
            out.line(
                f"rolled back to version {reply.source_version}: head is now version "
                f"{reply.version}; the next round starts from it"
            )
        return
    _print_rollback(out, new, tags, int(reply.source_version), int(reply.previous_head) or None)


@models_app.command("tag")
@command()
def models_tag(
    ref: RefArg,
    name: Annotated[str, typer.Argument(help="The tag, e.g. `best` or `paper-v1`.")],
    force: Annotated[bool, typer.Option(help="Move the tag if it names another version.")] = False,
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Give a version a name.

    A name that `show`, `diff`, `export` and `rollback` accept.
    """
    from flctl.cli._common import load_project
    from flctl.core.events import MODEL_TAGGED
    from flctl.transport.grpc import AdminClient

    config = load_project(config_path)

    async def call(client: AdminClient) -> Any:
        return await client.tag(ref, name, force=force)

    from flctl.cli._common import call_admin

    with contextlib.ExitStack() as stack:
        # --server: a coordinator elsewhere (or the leader of several); else this project's
        running = (
            {"address": server}
            if server
            else stack.enter_context(_lock_or_running(config, "models tag"))
        )
        if running is not None:
            reply = call_admin(config, server, call)
            version, before = int(reply.version), int(reply.previous) or None
        else:
            with _open_state(config, write=True) as (store, _):
                model = store.resolve_model(ref)
                with store.transaction():
                    before = {t.name: t.version for t in store.list_tags()}.get(name)
                    tag = store.add_tag(model.version, name, author=LOCAL_AUTHOR, force=force)
                    version = tag.version
                    if before != model.version:
                        store.append_event(
                            MODEL_TAGGED,
                            data={
                                "tag": name,
                                "version": model.version,
                                "previous": before,
                                "author": LOCAL_AUTHOR,
                            },
                        )
    out = Output(json_mode=json_output)
    if json_output:
        out.json({"tag": name, "version": version, "previous": before})
        return
    if before == version:
        out.line(f"tag {name!r} already names version {version}")
    elif before is None:
        out.line(f"tagged version {version} as {name!r}")
    else:
        out.line(f"moved tag {name!r} from version {before} to version {version}")


# ---------------------------------------------------------------------- export / import


def _lineage_doc(store: SqlStore, model: ModelRecord) -> list[dict[str, Any]]:
    return [
        {
            "version": m.version,
            "digest": m.digest,
            "kind": m.kind,
            "round": m.server_round,
            "metrics": m.metrics,
        }
        for m in store.lineage(model.version)
    ]


def _copy_verified(source: Path, target: Path, digest: str) -> None:
    """Copy a blob, checking on the way that its bytes still hash to its name."""
    import hashlib

    h = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while piece := src.read(1 << 20):
            h.update(piece)
            dst.write(piece)
    if h.hexdigest() != digest:
        raise IntegrityError(
            f"blob {digest[:12]} is corrupt: its content hashes to {h.hexdigest()[:12]}",
            hint="run `flctl models verify`",
        )


def _export_torch(source: Path, target: Path, digest: str) -> None:
    from flctl.tensors import save_torch_state_dict, sha256_file

    if sha256_file(source) != digest:
        raise IntegrityError(f"blob {digest[:12]} is corrupt", hint="run `flctl models verify`")
    save_torch_state_dict(source, target)


@models_app.command("export")
@command()
def models_export(
    ref: RefArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="safetensors (the blob as is) or torch (a state_dict)."),
    ] = ExportFormat.safetensors,
    force: Annotated[bool, typer.Option(help="Overwrite FILE and FILE.json.")] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write a version's weights to a file.

    FILE.json, written beside FILE, holds its lineage and metrics.
    """
    import json

    from flctl import __version__
    from flctl.cli._common import load_project
    from flctl.tensors import sha256_file

    config = load_project(config_path)
    output = Path(output)
    sidecar = output.with_name(output.name + ".json")
    if output.is_dir():
        raise InvalidInputError(f"{output} is a folder: give a file name with -o")
    for path in (output, sidecar):
        # the export is written beside FILE and renamed over it: that would replace a device,
        # a pipe or a socket with a regular file, --force or not
        if path.exists() and not path.is_file():
            raise InvalidInputError(
                f"{path} exists and is not a regular file: export writes a new file and "
                "renames it over the target, which would replace it",
                hint="give the name of a regular file (or a new one) with -o",
            )
        if path.exists() and not force:
            raise ConflictError(f"{path} already exists", hint="pass --force to overwrite it")
    if not output.parent.is_dir():
        raise NotFoundError(f"folder {output.parent} does not exist")
    with _open_state(config) as (store, blobs):
        model = store.resolve_model(ref)
        source = _existing_blob(blobs, model)
        head = _head_version(store)
        tags = store.tags_for(model.version)
        lineage = _lineage_doc(store, model)
        temp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            if fmt is ExportFormat.safetensors:
                _copy_verified(source, temp, model.digest)
            else:
                _export_torch(source, temp, model.digest)
            os.replace(temp, output)
        finally:
            temp.unlink(missing_ok=True)
    file_sha256 = model.digest if fmt is ExportFormat.safetensors else sha256_file(output)
    meta = {
        **model_dict(model, head, tags),
        "format": fmt.value,
        "file": output.name,
        "file_sha256": file_sha256,
        "lineage": lineage,
        "config": model.config,
        "exported": time.time(),
        "flctl": __version__,
    }
    sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "model": model_dict(model, head, tags),
                "file": str(output),
                "sidecar": str(sidecar),
                "format": fmt.value,
                "bytes": output.stat().st_size,
                "file_sha256": file_sha256,
            }
        )
        return
    out.line(
        f"exported version {model.version} ({fmt.value}, {_bytes(output.stat().st_size)}) "
        f"to {output}; lineage and metrics in {sidecar}"
    )


@models_app.command("import")
@command()
def models_import(
    file: Annotated[Path, typer.Argument(help="A safetensors file with the model's tensors.")],
    head: Annotated[bool, typer.Option("--head", help="Also make it the head model.")] = False,
    reason: Annotated[str, typer.Option(help="A note kept in the history.")] = "",
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Add a safetensors file as a new version.

    A version of kind import, checked against the head model.

    Its tensor names, shapes and dtypes must match the head's and its values be finite;
    otherwise nothing is written. It becomes head only with --head.
    """
    from flctl.cli._common import load_project
    from flctl.core.events import MODEL_IMPORTED
    from flctl.tensors import check_update, read_spec

    config = load_project(config_path)
    file = Path(file)
    if not file.is_file():
        raise NotFoundError(f"file {file} not found")
    with (
        _offline_lock(config, "models import"),
        _open_state(config, write=True) as (store, blobs),
    ):
        current = store.head()
        if current is None:
            raise NotFoundError(
                "there is no head model to check the file against",
                hint="start the coordinator once with `flctl serve` to create the initial model",
            )
        expected = read_spec(_existing_blob(blobs, current))
        # Check the copy, not the file: it cannot change between the check and the commit.
        temp, digest = blobs.stage_file(file)
        try:
            try:
                check_update(temp, expected)
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"{file} does not fit the model (head version {current.version}): "
                    f"{exc.message}",
                    hint="import takes a safetensors file of the same tensors "
                    "(`flctl models export` writes one)",
                ) from None
            blobs.commit_temp(temp, digest)
        finally:
            temp.unlink(missing_ok=True)
        with store.transaction():
            model = store.import_model(
                digest,
                head=head,
                author=LOCAL_AUTHOR,
                reason=reason or f"imported from {file.name}",
            )
            store.append_event(
                MODEL_IMPORTED,
                data={
                    "version": model.version,
                    "digest": model.digest,
                    "parent": model.parent,
                    "head": head,
                    "file": file.name,
                    "author": LOCAL_AUTHOR,
                },
            )
        head_version = _head_version(store)
    out = Output(json_mode=json_output)
    if json_output:
        out.json({"model": model_dict(model, head_version), "head": head_version})
        return
    where = "and made it the head" if head else f"(head stays version {head_version})"
    out.line(f"imported {file} as version {model.version} {where}; digest {digest[:12]}")


# ---------------------------------------------------------------------- verify / gc


@models_app.command("verify")
@command()
def models_verify(config_path: ConfigOpt = None, json_output: JsonOpt = False) -> None:
    """Re-hash every blob a version references.

    Exits 42 if one is missing or corrupt.
    """
    from flctl.cli._common import load_project
    from flctl.store import verify_models

    with _open_state(load_project(config_path), deep_check=True) as (store, blobs):
        checks = verify_models(store, blobs)
    bad = [c for c in checks if not c.is_ok]
    doc: dict[str, Any] = {
        "checked": len(checks),
        "ok": len(checks) - len(bad),
        "missing": [
            {"digest": c.digest, "versions": list(c.versions)}
            for c in checks
            if c.status == "missing"
        ],
        "corrupt": [
            {"digest": c.digest, "versions": list(c.versions), "size": c.size}
            for c in checks
            if c.status == "corrupt"
        ],
    }
    error = None
    if bad:
        error = IntegrityError(
            f"{len(bad)} of {len(checks)} model blobs are missing or corrupt",
            hint="restore them from a backup, or roll back to an intact version",
        )
        doc["error"] = error.to_dict()
    out = Output(json_mode=json_output)
    if json_output:
        out.json(doc)
        if error is not None:
            raise typer.Exit(error.exit_code)
        return
    for c in bad:
        versions = ", ".join(map(str, c.versions))
        out.line(f"{c.status}: blob {c.digest[:12]} (versions {versions})")
    if error is not None:
        raise error
    total = sum(c.size or 0 for c in checks)
    out.line(f"all {len(checks)} model blobs intact ({_bytes(total)})")


@models_app.command("gc")
@command()
def models_gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would be removed.")
    ] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Remove blobs that nothing references.

    A blob is kept while a version, an open round or an upload in progress references it.
    """
    from flctl.cli._common import load_project
    from flctl.store import collect_garbage

    config = load_project(config_path)
    if dry_run:
        with _open_state(config) as (store, blobs):
            report = collect_garbage(store, blobs, dry_run=True)
    else:
        with (
            _offline_lock(config, "models gc"),
            _open_state(config, write=True) as (store, blobs),
        ):
            report = collect_garbage(store, blobs)
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "dry_run": report.dry_run,
                "removed": [{"digest": d, "size": s} for d, s in report.removed],
                "bytes_freed": report.bytes_freed,
                "kept": report.kept,
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    for digest, size in report.removed:
        out.line(f"{verb} {digest[:12]} ({_bytes(size)})")
    out.line(
        f"{verb} {len(report.removed)} unreferenced blobs, "
        f"{'would free' if dry_run else 'freed'} {_bytes(report.bytes_freed)}; "
        f"kept {report.kept}"
    )
