"""Models, refs and the registry (tags, lineage, head moves, rollbacks, imports)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlmodel import col, select

from flctl.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
)
from flctl.store._database import Database
from flctl.store._records import (
    MODEL_KINDS,
    MODEL_STATUSES,
    TERMINAL,
    ModelRecord,
    PendingRollbackRecord,
    TagRecord,
)
from flctl.store._rows import (
    DIGEST_PREFIX_RE,
    HEAD,
    MIN_PREFIX,
    SHORT_HEX_RE,
    check_choice,
    check_limit,
    check_tag_name,
    dump_config,
    dump_metrics,
    get_model_row,
    insert_model,
    model_record,
    pending_record,
    set_ref,
    tag_record,
)
from flctl.store._tables import (
    ModelRow,
    PendingRollbackRow,
    RefRow,
    RoundRow,
    TagRow,
    UpdateRow,
)

__all__ = ["ModelStore"]


class ModelStore(Database):
    # -- models and refs --------------------------------------------------------------------

    def add_model(
        self,
        *,
        digest: str,
        kind: str,
        parent: int | None = None,
        server_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
        set_head: bool = False,
        status: str = "ok",
        reason: str = "",
        author: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Record a new model version (the next number, from 1).

        Args:
            digest: SHA-256 of the model's blob.
            kind: ``initial``, ``aggregate``, ``rollback`` or ``import``.
            parent: The version it derives from, if any; must exist.
            server_round: The round that produced it, if any.
            metrics: Metrics to keep with it.
            set_head: Also move ``head`` to it, in the same transaction.
            status: ``ok`` or ``rejected`` (a rejected version never becomes head).
            reason: Why it was rejected or written, for the user.
            author: Who made it (``round``, an admin identity, ``local``, ``policy``).
            config: The strategy and settings it was produced with (JSON-serialisable).

        Returns:
            The new version.

        Raises:
            InvalidInputError: Unknown kind or status, malformed metrics or config, or
                ``set_head`` with a rejected status.
            NotFoundError: ``parent`` does not exist.
        """
        check_choice("model kind", kind, MODEL_KINDS)
        check_choice("model status", status, MODEL_STATUSES)
        if set_head and status == "rejected":
            raise InvalidInputError("a rejected model version cannot become head")
        metrics_json = dump_metrics(metrics)
        config_json, config_hash = dump_config(config)
        with self.session(write=True) as session:
            if parent is not None and session.get(ModelRow, parent) is None:
                raise NotFoundError(f"model version {parent} not found")
            row = insert_model(
                session,
                digest=digest,
                kind=kind,
                parent=parent,
                server_round=server_round,
                metrics_json=metrics_json,
                status=status,
                reason=reason,
                author=author,
                config_json=config_json,
                config_hash=config_hash,
            )
            if set_head:
                set_ref(session, HEAD, row.version)
            record = model_record(row)
            self.commit(session)
        return record

    def head(self) -> ModelRecord | None:
        """Return the model ``head`` points at, or None before the first one."""
        with self.session() as session:
            ref = session.get(RefRow, HEAD)
            if ref is None:
                return None
            row = session.get(ModelRow, ref.version)
            return None if row is None else model_record(row)

    def get_model(self, version: int) -> ModelRecord:
        """Return one model version.

        Raises:
            NotFoundError: No such version.
        """
        with self.session() as session:
            row = session.get(ModelRow, version)
            if row is None:
                raise NotFoundError(f"model version {version} not found")
            return model_record(row)

    def list_models(
        self, limit: int | None = None, *, include_rejected: bool = True
    ) -> list[ModelRecord]:
        """Return model versions, newest first.

        Args:
            limit: At most this many (the newest); None for all.
            include_rejected: Include versions the validation gate rejected.
        """
        stmt = select(ModelRow).order_by(col(ModelRow.version).desc())
        if not include_rejected:
            stmt = stmt.where(col(ModelRow.status) != "rejected")
        if limit is not None:
            stmt = stmt.limit(check_limit(limit))
        with self.session() as session:
            return [model_record(row) for row in session.exec(stmt)]

    def referenced_digests(self) -> set[str]:
        """Return every digest the blob store must keep.

        That is every model's digest and strategy state's digest, plus the digests of accepted
        updates of rounds that have not reached a terminal status (they may still be
        aggregated).
        """
        updates = (
            select(UpdateRow.digest)
            .join(RoundRow, col(RoundRow.id) == col(UpdateRow.server_round))
            .where(
                col(UpdateRow.status) == "accepted",
                col(UpdateRow.digest) != "",
                col(RoundRow.status).not_in(TERMINAL),
            )
        )
        with self.session() as session:
            out = set(session.exec(select(ModelRow.digest)))
            out.update(session.exec(updates))
            out.update(
                session.exec(select(ModelRow.state_digest).where(col(ModelRow.state_digest) != ""))
            )
        return out

    # -- the registry: references, lineage, tags, head moves ---------------------------------

    def resolve_model(self, ref: str) -> ModelRecord:
        """Find the model version a user means by ``ref``.

        In this order: an integer is a version; ``head`` is the head; a tag's name is the
        version it names; 6 to 64 lowercase hex characters are a digest prefix, which must
        match one digest (several versions may share it, after a rollback: the oldest, the
        one that produced those weights, is returned).

        Args:
            ref: What the user typed.

        Returns:
            The version.

        Raises:
            NotFoundError: Nothing matches.
            InvalidInputError: An empty ref, a hex prefix shorter than 6 characters, or a
                prefix that matches more than one digest.
        """
        ref = str(ref).strip()
        if not ref:
            raise InvalidInputError("empty model reference: give a version, a tag or a digest")
        if ref.isascii() and ref.isdigit():
            return self.get_model(int(ref))
        with self.session() as session:
            if ref == HEAD:
                head = session.get(RefRow, HEAD)
                if head is None:
                    raise NotFoundError("there is no head model yet")
                return model_record(get_model_row(session, head.version))
            tag = session.get(TagRow, ref)
            if tag is not None:
                return model_record(get_model_row(session, tag.version))
            if DIGEST_PREFIX_RE.fullmatch(ref) is None:
                if SHORT_HEX_RE.fullmatch(ref):
                    raise InvalidInputError(
                        f"digest prefix {ref!r} is too short: give at least {MIN_PREFIX} "
                        "hex characters"
                    )
                raise NotFoundError(
                    f"no model version, tag or digest matches {ref!r}",
                    hint="list them with `flctl models ls --all`",
                )
            rows = list(
                session.exec(
                    select(ModelRow)
                    .where(col(ModelRow.digest).startswith(ref))
                    .order_by(col(ModelRow.version))
                )
            )
        if not rows:
            raise NotFoundError(
                f"no model version has a digest starting with {ref!r}",
                hint="list them with `flctl models ls --all`",
            )
        digests = {row.digest for row in rows}
        if len(digests) > 1:
            raise InvalidInputError(
                f"ambiguous digest prefix {ref!r} matches versions "
                f"{[row.version for row in rows]}: give more characters",
                details={"versions": [row.version for row in rows]},
            )
        return model_record(rows[0])

    def lineage(self, version: int) -> list[ModelRecord]:
        """Return ``version`` and its parent chain, down to the version that has no parent.

        Raises:
            NotFoundError: No such version.
        """
        out: list[ModelRecord] = []
        seen: set[int] = set()
        with self.session() as session:
            row: ModelRow | None = get_model_row(session, version)
            while row is not None and row.version not in seen:
                seen.add(row.version)
                out.append(model_record(row))
                row = None if row.parent is None else session.get(ModelRow, row.parent)
        return out

    def versions_with_digest(self, digest: str) -> list[int]:
        """Return the versions whose blob is ``digest``, ascending."""
        stmt = (
            select(ModelRow.version)
            .where(col(ModelRow.digest) == digest)
            .order_by(col(ModelRow.version))
        )
        with self.session() as session:
            return [int(v) for v in session.exec(stmt)]

    def add_tag(
        self, version: int, name: str, *, author: str = "", force: bool = False
    ) -> TagRecord:
        """Name a model version.

        Args:
            version: The version.
            name: A letter, then up to 63 letters, digits, ``.``, ``_`` or ``-``; not ``head``
                and not something that reads as a digest prefix (6+ hex characters).
            author: Who sets it.
            force: Move the tag if it already names another version.

        Returns:
            The tag.

        Raises:
            InvalidInputError: A malformed or reserved name.
            NotFoundError: No such version.
            ConflictError: The tag names another version and ``force`` is not set.
        """
        check_tag_name(name)
        with self.session(write=True) as session:
            get_model_row(session, version)
            row = session.get(TagRow, name)
            if row is not None and row.version != version and not force:
                raise ConflictError(
                    f"tag {name!r} already names version {row.version}",
                    hint="pass --force to move it",
                    details={"tag": name, "version": row.version},
                )
            if row is None:
                row = TagRow(name=name, version=version, author=author, created=time.time())
                session.add(row)
            elif row.version != version:
                row.version, row.author, row.created = version, author, time.time()
                session.add(row)
            session.flush()
            record = tag_record(row)
            self.commit(session)
        return record

    def remove_tag(self, name: str) -> TagRecord:
        """Delete a tag (the version stays).

        Returns:
            The tag as it was.

        Raises:
            NotFoundError: No such tag.
        """
        with self.session(write=True) as session:
            row = session.get(TagRow, name)
            if row is None:
                raise NotFoundError(f"tag {name!r} not found")
            record = tag_record(row)
            session.delete(row)
            self.commit(session)
        return record

    def tags_for(self, version: int) -> list[str]:
        """Return the names of the tags on ``version``, sorted."""
        stmt = select(TagRow.name).where(col(TagRow.version) == version).order_by(col(TagRow.name))
        with self.session() as session:
            return [str(name) for name in session.exec(stmt)]

    def list_tags(self) -> list[TagRecord]:
        """Return every tag, by name."""
        with self.session() as session:
            return [tag_record(row) for row in session.exec(select(TagRow).order_by(TagRow.name))]

    def set_head(
        self, version: int, *, kind: str = "rollback", author: str, reason: str = ""
    ) -> ModelRecord:
        """Make ``version``'s weights the head again, as a NEW version; history stays.

        Writes a version of kind ``kind`` whose digest, metrics, config and strategy state are
        those of ``version``, with parent = the current head and ``source`` = ``version``, and moves
        ``head`` to it, in one transaction. The caller records the event.

        Args:
            version: The version to go back (or forward) to.
            kind: The new version's kind (``rollback``).
            author: Who asks (an admin identity, ``local`` or ``policy``).
            reason: Why, for the history.

        Returns:
            The new head version.

        Raises:
            InvalidInputError: Unknown kind.
            NotFoundError: No such version.
            ConflictError: The head already holds those weights.
        """
        check_choice("model kind", kind, MODEL_KINDS)
        with self.session(write=True) as session:
            target = get_model_row(session, version)
            ref = session.get(RefRow, HEAD)
            head = None if ref is None else session.get(ModelRow, ref.version)
            if head is not None and head.digest == target.digest:
                raise ConflictError(
                    f"the head (version {head.version}) already holds the weights of version "
                    f"{version} (digest {target.digest[:12]})",
                    details={"head": head.version, "version": version},
                )
            row = insert_model(
                session,
                digest=target.digest,
                kind=kind,
                parent=None if head is None else head.version,
                server_round=None,
                metrics_json=target.metrics,
                status="ok",
                reason=reason,
                author=author,
                config_json=target.config_json,
                config_hash=target.config_hash,
                source=target.version,
                state_digest=target.state_digest,
            )
            set_ref(session, HEAD, row.version)
            record = model_record(row)
            self.commit(session)
        return record

    def defer_rollback(
        self, source: int, *, author: str, reason: str, server_round: int
    ) -> PendingRollbackRecord:
        """Remember a rollback to ``source`` to apply when round ``server_round`` ends.

        Raises:
            NotFoundError: No such version.
        """
        row = PendingRollbackRow(
            source=source,
            author=author,
            reason=reason,
            server_round=server_round,
            created=time.time(),
        )
        with self.session(write=True) as session:
            get_model_row(session, source)
            session.add(row)
            session.flush()
            record = pending_record(row)
            self.commit(session)
        return record

    def pending_rollbacks(self) -> list[PendingRollbackRecord]:
        """Return the deferred rollbacks not yet applied, in the order they were asked for."""
        stmt = select(PendingRollbackRow).order_by(col(PendingRollbackRow.id))
        with self.session() as session:
            return [pending_record(row) for row in session.exec(stmt)]

    def drop_pending_rollback(self, pending_id: int) -> None:
        """Forget a deferred rollback (applied, or failed); unknown ids are ignored."""
        with self.session(write=True) as session:
            row = session.get(PendingRollbackRow, pending_id)
            if row is not None:
                session.delete(row)
            self.commit(session)

    def import_model(
        self,
        digest: str,
        *,
        head: bool,
        author: str,
        metrics: Mapping[str, float] | None = None,
        reason: str = "",
    ) -> ModelRecord:
        """Record a model brought in from outside (its blob is already in the blob store).

        The new version has kind ``import`` and parent = the current head (the model it was
        validated against); ``head`` moves to it only when asked.

        Args:
            digest: SHA-256 of its blob.
            head: Also make it the head.
            author: Who imports it.
            metrics: Metrics to keep with it, if known.
            reason: A note for the history.

        Returns:
            The new version.
        """
        metrics_json = dump_metrics(metrics)
        with self.session(write=True) as session:
            ref = session.get(RefRow, HEAD)
            row = insert_model(
                session,
                digest=digest,
                kind="import",
                parent=None if ref is None else ref.version,
                server_round=None,
                metrics_json=metrics_json,
                reason=reason,
                author=author,
            )
            if head:
                set_ref(session, HEAD, row.version)
            record = model_record(row)
            self.commit(session)
        return record
