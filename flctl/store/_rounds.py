"""Rounds and the updates clients sent for them."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    func,
    update,
)
from sqlmodel import col, select

from flctl.core.errors import (
    InvalidInputError,
    NotFoundError,
)
from flctl.store._database import Database
from flctl.store._records import (
    MODEL_STATUSES,
    ROUND_STATUSES,
    TERMINAL,
    UPDATE_STATUSES,
    ModelRecord,
    RoundRecord,
    UpdateRecord,
)
from flctl.store._rows import (
    HEAD,
    IN_PROGRESS,
    check_choice,
    check_limit,
    dump_config,
    dump_json,
    dump_metrics,
    dump_scores,
    get_round_row,
    guarded_round_update,
    insert_model,
    load_dict,
    model_record,
    round_record,
    row_id,
    set_ref,
    update_record,
)
from flctl.store._tables import (
    RefRow,
    RoundRow,
    UpdateRow,
)

__all__ = ["RoundStore"]


class RoundStore(Database):
    # -- rounds -----------------------------------------------------------------------------

    def create_rounds(self, count: int, config: Mapping[str, Any] | None = None) -> list[int]:
        """Queue ``count`` rounds.

        Args:
            count: How many, at least 1.
            config: Per-round settings (JSON-serialisable), stored with each.

        Returns:
            The new round ids, ascending (global to the store, from 1).

        Raises:
            InvalidInputError: ``count`` < 1 or ``config`` is not JSON-serialisable.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"round count must be a positive integer, got {count!r}")
        config_json = dump_json(dict(config or {}), "round config")
        now = time.time()
        with self.session(write=True) as session:
            rows = [
                RoundRow(status="queued", created=now, config=config_json) for _ in range(count)
            ]
            session.add_all(rows)
            session.flush()
            ids = [row_id(row.id) for row in rows]
            self.commit(session)
        return sorted(ids)

    def get_round(self, round_id: int) -> RoundRecord:
        """Return one round.

        Raises:
            NotFoundError: No such round.
        """
        with self.session() as session:
            return round_record(get_round_row(session, round_id))

    def list_rounds(
        self, ids: Sequence[int] | None = None, limit: int | None = None, before: int = 0
    ) -> list[RoundRecord]:
        """Return rounds in ascending id order.

        Args:
            ids: Only these rounds (ids that do not exist are left out); None for all.
            limit: Only the ``limit`` most recent of them (still returned ascending).
            before: Only rounds with ids below this one (0: no bound): pages backwards.
        """
        stmt = select(RoundRow).order_by(col(RoundRow.id).desc())
        if before > 0:
            stmt = stmt.where(col(RoundRow.id) < before)
        if ids is not None:
            if not ids:
                return []
            stmt = stmt.where(col(RoundRow.id).in_(list(ids)))
        if limit is not None:
            stmt = stmt.limit(check_limit(limit))
        with self.session() as session:
            rows = list(session.exec(stmt))
        return [round_record(row) for row in reversed(rows)]

    def count_rounds(self) -> int:
        """How many rounds the store holds, whatever their status."""
        with self.session() as session:
            return int(session.exec(select(func.count()).select_from(RoundRow)).one())

    def next_queued_round(self) -> RoundRecord | None:
        """Return the queued round with the lowest id, or None."""
        stmt = (
            select(RoundRow)
            .where(col(RoundRow.status) == "queued")
            .order_by(col(RoundRow.id))
            .limit(1)
        )
        with self.session() as session:
            row = session.exec(stmt).first()
            return None if row is None else round_record(row)

    def open_rounds(self) -> list[RoundRecord]:
        """Return rounds in progress (neither queued nor terminal), ascending."""
        stmt = (
            select(RoundRow).where(col(RoundRow.status).in_(IN_PROGRESS)).order_by(col(RoundRow.id))
        )
        with self.session() as session:
            return [round_record(row) for row in session.exec(stmt)]

    def set_round_status(
        self,
        round_id: int,
        status: str,
        *,
        reason: str | None = None,
        started: float | None = None,
        base_version: int | None = None,
        selected: Sequence[str] | None = None,
        deadline: float | None = None,
        ended: float | None = None,
        tasks: Mapping[str, str] | None = None,
        fit_config: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> RoundRecord:
        """Move a round to ``status`` and set the fields given (None leaves a field as is).

        A terminal status (``failed``, ``cancelled``) sets ``ended`` to now unless given.
        ``committed`` and ``rejected`` are refused here: only :meth:`commit_round` ends a round
        with its model.

        Returns:
            The round as updated.

        Raises:
            InvalidInputError: Unknown status, or ``committed`` or ``rejected``.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        check_choice("round status", status, ROUND_STATUSES)
        if status in ("committed", "rejected"):
            raise InvalidInputError(f"a round is {status} only by commit_round, with its model")
        values: dict[str, Any] = {"status": status}
        if reason is not None:
            values["reason"] = reason
        if started is not None:
            values["started"] = started
        if base_version is not None:
            values["base_version"] = base_version
        if selected is not None:
            if isinstance(selected, str):
                raise InvalidInputError("selected must be a sequence of client ids, not a str")
            values["selected"] = json.dumps([str(c) for c in selected])
        if deadline is not None:
            values["deadline"] = deadline
        if tasks is not None:
            values["tasks"] = json.dumps({str(k): str(v) for k, v in tasks.items()})
        if fit_config is not None:
            values["fit_config"] = dump_json(
                {str(k): dict(v) for k, v in fit_config.items()}, "fit config"
            )
        if ended is None and status in TERMINAL:
            ended = time.time()
        if ended is not None:
            values["ended"] = ended
        with self.session(write=True) as session:
            guarded_round_update(session, round_id, values)
            record = round_record(get_round_row(session, round_id))
            self.commit(session)
        return record

    def commit_round(
        self,
        round_id: int,
        *,
        digest: str,
        metrics: Mapping[str, float],
        num_clients: int,
        status: str = "ok",
        reason: str = "",
        state_digest: str = "",
    ) -> ModelRecord:
        """Commit a round and its aggregate, all in one transaction.

        Inserts the model (kind ``aggregate``, author ``round``, parent = the current head,
        ``server_round`` = ``round_id``, config = the round's config), moves ``head`` to it
        unless ``status`` is ``rejected``, and ends the round with its model version, metrics,
        number of clients and end time: as ``committed``, or as ``rejected`` (with ``reason``)
        when the gate refused the model. Nothing is written on failure.

        Args:
            round_id: The round.
            digest: SHA-256 of the aggregated model's blob.
            metrics: The round's metrics, kept on both the round and the model.
            num_clients: Number of updates in the aggregate.
            status: ``ok``, or ``rejected`` when the validation gate refused the aggregate:
                the version is stored with ``reason`` but ``head`` stays where it is.
            reason: Why it was rejected.
            state_digest: The blob of the strategy's state after this round, or "".

        Returns:
            The new model version.

        Raises:
            InvalidInputError: Unknown status.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        check_choice("model status", status, MODEL_STATUSES)
        metrics_json = dump_metrics(metrics)
        with self.session(write=True) as session:
            # The guarded update comes first so that a terminal round writes nothing at all.
            guarded_round_update(
                session,
                round_id,
                {
                    "status": "committed" if status == "ok" else "rejected",
                    "metrics": metrics_json,
                    "num_clients": num_clients,
                    "ended": time.time(),
                    **({"reason": reason} if status == "rejected" else {}),
                },
            )
            ref = session.get(RefRow, HEAD)
            round_row = get_round_row(session, round_id)
            config_json, config_hash = dump_config(load_dict(round_row.config))
            row = insert_model(
                session,
                digest=digest,
                kind="aggregate",
                parent=None if ref is None else ref.version,
                server_round=round_id,
                metrics_json=metrics_json,
                status=status,
                reason=reason,
                author="round",
                config_json=config_json,
                config_hash=config_hash,
                state_digest=state_digest,
            )
            session.exec(
                update(RoundRow)
                .where(col(RoundRow.id) == round_id)
                .values(model_version=row.version)
            )
            if status == "ok":
                set_ref(session, HEAD, row.version)
            record = model_record(row)
            self.commit(session)
        return record

    def fail_round(self, round_id: int, reason: str, *, status: str = "failed") -> RoundRecord:
        """End a round without a model; ``head`` does not move.

        Args:
            round_id: The round.
            reason: Why, for the user.
            status: ``failed`` or ``cancelled``.

        Raises:
            InvalidInputError: ``status`` is neither.
            NotFoundError: No such round.
            ConflictError: The round is already terminal.
        """
        check_choice("failure status", status, ("failed", "cancelled"))
        return self.set_round_status(round_id, status, reason=reason)

    # -- updates ----------------------------------------------------------------------------

    def add_update(
        self,
        *,
        server_round: int,
        client_id: str,
        task_id: str,
        status: str,
        reason: str = "",
        digest: str = "",
        size: int = 0,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
        scores: Mapping[str, float | None] | None = None,
    ) -> UpdateRecord:
        """Record an update a client sent, accepted or rejected.

        The round is not required to exist: wrong-round updates are recorded as rejected.
        ``scores`` are an accepted update's anomaly scores, when taken before it is recorded
        (as for :meth:`set_update_scores`).

        Raises:
            InvalidInputError: ``status`` is not ``accepted`` or ``rejected``, bad metrics or
                scores, or scores for a rejected update.
        """
        check_choice("update status", status, UPDATE_STATUSES)
        if scores is not None and status != "accepted":
            raise InvalidInputError("only an accepted update has anomaly scores")
        row = UpdateRow(
            server_round=server_round,
            client_id=client_id,
            task_id=task_id,
            status=status,
            reason=reason,
            digest=digest,
            size=size,
            num_examples=num_examples,
            metrics=dump_metrics(metrics),
            created=time.time(),
            scores=None if scores is None else dump_scores(scores),
        )
        with self.session(write=True) as session:
            session.add(row)
            session.flush()
            record = update_record(row)
            self.commit(session)
        return record

    def set_update_scores(
        self,
        update_id: int,
        scores: Mapping[str, float | None] | None = None,
        *,
        outlier: str = "",
        excluded: bool = False,
    ) -> UpdateRecord:
        """Record an accepted update's anomaly scores, and what the outlier rule made of it.

        Each call sets all three: call it when the update is scored, and again once the round
        has all its scores (a whole-round strategy's ``median_distance``, the rule's verdict).

        Args:
            update_id: The update (:attr:`UpdateRecord.id`).
            scores: Score name -> a finite number or None (``AnomalyScores.to_dict()``); None
                keeps the scores already recorded.
            outlier: Why the rule marked it (``Outlier.reason``), or "" when it did not.
            excluded: It was left out of the aggregate (``exclude_outliers = "drop"``); needs
                an ``outlier`` reason.

        Raises:
            NotFoundError: No such update.
            InvalidInputError: It was rejected, scores that are not finite numbers, or
                ``excluded`` without a reason.
        """
        if excluded and not outlier:
            raise InvalidInputError("an excluded update needs the outlier rule's reason")
        dumped = None if scores is None else dump_scores(scores)
        with self.session(write=True) as session:
            row = session.get(UpdateRow, update_id)
            if row is None:
                raise NotFoundError(f"no update {update_id}")
            if row.status != "accepted":
                raise InvalidInputError(
                    f"update {update_id} was {row.status}: only an accepted update is scored"
                )
            if dumped is not None:
                row.scores = dumped
            row.outlier = outlier
            row.excluded = excluded
            session.add(row)
            session.flush()
            record = update_record(row)
            self.commit(session)
        return record

    def updates_for_round(self, server_round: int, status: str | None = None) -> list[UpdateRecord]:
        """Return a round's updates in the order they arrived.

        Args:
            server_round: The round.
            status: Only ``accepted`` or only ``rejected`` ones; None for both.
        """
        stmt = select(UpdateRow).where(col(UpdateRow.server_round) == server_round)
        if status is not None:
            check_choice("update status", status, UPDATE_STATUSES)
            stmt = stmt.where(col(UpdateRow.status) == status)
        with self.session() as session:
            return [update_record(r) for r in session.exec(stmt.order_by(col(UpdateRow.id)))]

    def has_accepted_update(self, server_round: int, client_id: str) -> bool:
        """Return whether ``client_id`` already has an accepted update in ``server_round``."""
        stmt = (
            select(UpdateRow.id)
            .where(
                col(UpdateRow.server_round) == server_round,
                col(UpdateRow.client_id) == client_id,
                col(UpdateRow.status) == "accepted",
            )
            .limit(1)
        )
        with self.session() as session:
            return session.exec(stmt).first() is not None
