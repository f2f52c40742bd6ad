"""The privacy ledger: one row per round charged to the privacy budget (``dp_ledger`` table).

A round is charged once noised information about the clients left the aggregator (central DP:
once the noisy aggregate is computed) or the clients (local DP: once any noised update was
accepted), whether the round then commits or fails. Each row keeps the round's mechanism
(noise multiplier, sampling) and the epsilon the whole ledger reached after it, at the job's
``target_delta``, under RDP and (Poisson sampling only) PLD. With adaptive clipping it also
keeps the noised fraction of unclipped updates and the clip norm the next round starts from,
so a restarted coordinator carries on with it. Rows are never deleted: the ledger is the job's
record of the privacy it spent.

The table is defined on the store's own table base, and :mod:`flctl.store._schema` imports this
module, so ``SqlStore`` creates it with the others (``CREATE TABLE IF NOT EXISTS``: databases
written before it existed get it when next opened).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlmodel import Field, col, select

from flctl.core.errors import InvalidInputError
from flctl.store._tables import TableBase

if TYPE_CHECKING:
    from flctl.store._sql import SqlStore

__all__ = ["LedgerRecord", "LedgerRow", "charge", "ledger"]

Mechanism = Literal["central", "local"]


class LedgerRow(TableBase, table=True):
    """One charged round."""

    __tablename__ = "dp_ledger"

    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(index=True)
    mechanism: str = Field(max_length=16)
    noise_multiplier: float
    sampling: str = Field(max_length=16)
    sampling_rate: float
    population: int | None = None
    sample_size: int | None = None
    clip_norm: float
    epsilon_rdp: float
    epsilon_pld: float | None = None
    delta: float
    created: float
    # Schema version 4 (local DP and adaptive clipping): nullable, so that ``ALTER TABLE ...
    # ADD COLUMN`` can add them to a database that already has rows.
    unclipped_fraction: float | None = None
    next_clip_norm: float | None = None


@dataclass(frozen=True)
class LedgerRecord:
    """One charged round.

    Attributes:
        id: Its row id, from 1 (the order rounds were charged in).
        round_id: The round charged.
        mechanism: ``central`` or ``local``.
        noise_multiplier: The round's ``z`` (local: the std of each client's noise over ``C``).
        sampling: ``poisson`` or ``fixed``.
        sampling_rate: ``q`` (fixed sampling: ``sample_size / population``; local: 1.0, as
            accounted: the coordinator chose the sample, so it amplifies nothing).
        population: Fixed sampling: ``N``; None for Poisson.
        sample_size: Fixed sampling: ``M``; None for Poisson.
        clip_norm: The clipping norm the round used.
        epsilon_rdp: Epsilon of the whole ledger after this round, RDP accountant.
        epsilon_pld: The same under the PLD accountant; None where PLD cannot account for it.
        delta: The delta both epsilons are at.
        created: Unix time it was charged.
        unclipped_fraction: Adaptive clipping: the noised fraction of updates whose norm was at
            most ``clip_norm``; None otherwise.
        next_clip_norm: Adaptive clipping: the clip norm the next round starts from.
    """

    id: int
    round_id: int
    mechanism: str
    noise_multiplier: float
    sampling: str
    sampling_rate: float
    population: int | None
    sample_size: int | None
    clip_norm: float
    epsilon_rdp: float
    epsilon_pld: float | None
    delta: float
    created: float
    unclipped_fraction: float | None = None
    next_clip_norm: float | None = None

    def mechanism_args(self) -> dict[str, Any]:
        """The round's mechanism as ``flctl.privacy.SampledGaussianRound`` takes it (keywords).

        A local round is each client's own release, as ``flctl.privacy.local_round`` accounts
        it: a Gaussian mechanism of sensitivity ``2C`` (noise multiplier ``z / 2``), unsampled.
        """
        if self.mechanism == "local":
            return {
                "noise_multiplier": self.noise_multiplier / 2,
                "sampling": "poisson",
                "sampling_rate": 1.0,
            }
        if self.sampling == "fixed":
            return {
                "noise_multiplier": self.noise_multiplier,
                "sampling": "fixed",
                "population": self.population,
                "sample_size": self.sample_size,
            }
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling": "poisson",
            "sampling_rate": self.sampling_rate,
        }


def charge(
    store: SqlStore,
    round_id: int,
    *,
    mechanism: Mechanism,
    noise_multiplier: float,
    sampling: Literal["poisson", "fixed"],
    sampling_rate: float,
    clip_norm: float,
    epsilon_rdp: float,
    delta: float,
    epsilon_pld: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
    unclipped_fraction: float | None = None,
    next_clip_norm: float | None = None,
) -> LedgerRecord:
    """Append one charged round to the ledger.

    Raises:
        InvalidInputError: An unknown mechanism or sampling, or a value out of range.
    """
    if mechanism not in ("central", "local"):
        raise InvalidInputError(f"mechanism must be 'central' or 'local', not {mechanism!r}")
    if sampling not in ("poisson", "fixed"):
        raise InvalidInputError(f"sampling must be 'poisson' or 'fixed', not {sampling!r}")
    if sampling == "fixed" and (population is None or sample_size is None):
        raise InvalidInputError("fixed sampling is charged with its population and sample_size")
    for label, value in (
        ("noise_multiplier", noise_multiplier),
        ("sampling_rate", sampling_rate),
        ("clip_norm", clip_norm),
        ("epsilon_rdp", epsilon_rdp),
        ("delta", delta),
        *([("epsilon_pld", epsilon_pld)] if epsilon_pld is not None else []),
        *([("next_clip_norm", next_clip_norm)] if next_clip_norm is not None else []),
    ):
        if not math.isfinite(value) or value < 0:
            raise InvalidInputError(f"{label} must be a finite number >= 0, not {value!r}")
    if unclipped_fraction is not None and not math.isfinite(unclipped_fraction):
        raise InvalidInputError(f"unclipped_fraction must be finite, not {unclipped_fraction!r}")
    row = LedgerRow(
        round_id=round_id,
        mechanism=mechanism,
        noise_multiplier=float(noise_multiplier),
        sampling=sampling,
        sampling_rate=float(sampling_rate),
        population=population,
        sample_size=sample_size,
        clip_norm=float(clip_norm),
        epsilon_rdp=float(epsilon_rdp),
        epsilon_pld=None if epsilon_pld is None else float(epsilon_pld),
        delta=float(delta),
        created=time.time(),
        unclipped_fraction=None if unclipped_fraction is None else float(unclipped_fraction),
        next_clip_norm=None if next_clip_norm is None else float(next_clip_norm),
    )
    with store.session(write=True) as session:
        session.add(row)
        session.flush()
        record = _record(row)
        store.commit(session)
    return record


def ledger(store: SqlStore) -> list[LedgerRecord]:
    """Every charged round, in the order it was charged."""
    with store.session() as session:
        return [_record(row) for row in session.exec(select(LedgerRow).order_by(col(LedgerRow.id)))]


def _record(row: LedgerRow) -> LedgerRecord:
    if row.id is None:  # pragma: no cover - flush always assigns the primary key
        raise InvalidInputError("the database did not assign a ledger id")
    return LedgerRecord(
        id=row.id,
        round_id=row.round_id,
        mechanism=row.mechanism,
        noise_multiplier=row.noise_multiplier,
        sampling=row.sampling,
        sampling_rate=row.sampling_rate,
        population=row.population,
        sample_size=row.sample_size,
        clip_norm=row.clip_norm,
        epsilon_rdp=row.epsilon_rdp,
        epsilon_pld=row.epsilon_pld,
        delta=row.delta,
        created=row.created,
        unclipped_fraction=row.unclipped_fraction,
        next_clip_norm=row.next_clip_norm,
    )
