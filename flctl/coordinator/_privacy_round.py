"""Differential privacy in a round: the budget check, the sampling's numbers, the ledger charge.

The round engine asks :class:`PrivacyRounds` before a round selects anyone (:meth:`refusal`:
would this round take epsilon past ``epsilon_budget``?), for the numbers DP-FedAvg needs
(:meth:`denominator`, :meth:`clip_norm`, :meth:`adaptive`), and to charge the round to the
``dp_ledger`` table as soon as its noisy release exists (:meth:`charge`; for local DP, as soon
as one noised update was accepted, and at the next start for a round a crash interrupted:
:meth:`charge_released`). See docs/privacy.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from flctl.core import Config
from flctl.core import events as ev
from flctl.core.errors import BudgetExhaustedError
from flctl.privacy import (
    Accountant,
    AccountantName,
    AdaptiveClipping,
    SampledGaussianRound,
    default_count_stddev,
    local_round,
)
from flctl.store import LedgerRecord, SqlStore, charge, ledger

from ._events import EventLog

__all__ = ["PrivacyRounds"]

log = logging.getLogger("flctl.coordinator")


class PrivacyRounds:
    """The ``[privacy]`` side of each round: budget, sampling numbers and ledger charges."""

    def __init__(self, config: Config, store: SqlStore, events: EventLog) -> None:
        self._config = config
        self._store = store
        self._events = events

    def mechanism(self) -> SampledGaussianRound | None:
        """This job's round as the accountant charges it; None without privacy.

        Local DP: each participating client's own release (:func:`flctl.privacy.local_round`).
        """
        p = self._config.privacy
        if p.mode == "local":
            return local_round(p.noise_multiplier)
        if p.mode != "central":
            return None
        if p.sampling == "fixed":
            return SampledGaussianRound(
                p.noise_multiplier, "fixed", population=p.population, sample_size=p.sample_size
            )
        return SampledGaussianRound(p.noise_multiplier, "poisson", p.sampling_rate)

    def denominator(self, connected: int) -> float:
        """The expected number of clients per round, that DP-FedAvg divides the sum by.

        Fixed-size sampling: ``sample_size``. Poisson: ``sampling_rate * population``, with the
        number of clients connected at selection standing for an undeclared population.
        """
        p = self._config.privacy
        if p.sampling == "fixed":
            return float(p.sample_size)
        return p.sampling_rate * float(p.population or connected)

    def clip_norm(self) -> float:
        """The clip norm of the next central round: with adaptive clipping, the ledger's latest.

        The ledger row of each charged round keeps the clip norm the next round starts from,
        so a restarted coordinator carries on from it; without one, ``clip_norm`` (the start).
        """
        p = self._config.privacy
        if p.adaptive_clip:
            for row in reversed(ledger(self._store)):
                if row.next_clip_norm is not None:
                    return row.next_clip_norm
        return p.clip_norm

    def adaptive(self, denominator: float) -> AdaptiveClipping | None:
        """Adaptive clipping's rule for a round of ``denominator`` expected clients, or None.

        Raises:
            PrivacyError: The count's noise (``clip_count_stddev``, or expected clients / 20)
                would take the whole ``noise_multiplier``.
        """
        p = self._config.privacy
        if p.mode != "central" or not p.adaptive_clip:
            return None
        stddev = p.clip_count_stddev or default_count_stddev(denominator)
        adaptive = AdaptiveClipping(p.target_quantile, p.clip_learning_rate, stddev)
        adaptive.update_noise_multiplier(p.noise_multiplier)  # fail before any noise is drawn
        return adaptive

    def charge_released(self, server_round: int) -> LedgerRecord | None:
        """Charge a local-DP round whose clients' noised updates were accepted, if not yet.

        For a round that ends outside the normal path: the coordinator stopped while it waited
        for updates, or (called at start) a crash interrupted it. Synchronous: it must not be
        lost to a cancellation.
        """
        p = self._config.privacy
        mechanism = self.mechanism()
        if p.mode != "local" or mechanism is None:
            return None
        if not self._store.updates_for_round(server_round, status="accepted"):
            return None
        records = ledger(self._store)
        if any(r.round_id == server_round for r in records):
            return None
        accountant = Accountant(
            p.target_delta, [SampledGaussianRound(**r.mechanism_args()) for r in records]
        )
        accountant.charge(mechanism)
        return self._write_charge(
            server_round, mechanism, accountant.epsilons(), clip_norm=p.clip_norm
        )

    def accountant(self) -> Accountant:
        return Accountant(
            self._config.privacy.target_delta,
            [SampledGaussianRound(**r.mechanism_args()) for r in ledger(self._store)],
        )

    async def refusal(self, server_round: int, mechanism: SampledGaussianRound) -> str | None:
        """None if this round keeps epsilon within budget, else why not.

        A refusal is a ``privacy.refused`` event; the engine fails the round with the reason.
        """
        p = self._config.privacy

        accountant = self.accountant()  # the store is read here, the arithmetic in a thread
        reached = await asyncio.to_thread(
            accountant.epsilon_after, mechanism, accountant=p.accountant
        )
        if reached <= p.epsilon_budget:
            return None
        reason = (
            f"{BudgetExhaustedError.reason_prefix}: epsilon would reach {reached:.6g} > budget "
            f"{p.epsilon_budget:g} ({p.accountant}, delta {p.target_delta:g})"
        )
        self._events.emit(
            ev.PrivacyRefused(
                reason=reason,
                epsilon=reached,
                budget=p.epsilon_budget,
                accountant=p.accountant,
                delta=p.target_delta,
            ),
            server_round=server_round,
        )
        return reason

    async def charge(
        self,
        server_round: int,
        mechanism: SampledGaussianRound,
        *,
        clip_norm: float,
        unclipped_fraction: float | None = None,
        next_clip_norm: float | None = None,
    ) -> LedgerRecord:
        """Append the round to the privacy ledger, with the epsilon the ledger reaches."""
        accountant = self.accountant()
        accountant.charge(mechanism)

        def write(spent: Mapping[AccountantName, float | None]) -> LedgerRecord:
            return self._write_charge(
                server_round,
                mechanism,
                spent,
                clip_norm=clip_norm,
                unclipped_fraction=unclipped_fraction,
                next_clip_norm=next_clip_norm,
            )

        try:
            spent = await asyncio.to_thread(accountant.epsilons)
        except asyncio.CancelledError:
            # the noisy release exists: charge it even when the coordinator is stopping
            write(accountant.epsilons())
            raise
        return write(spent)

    def _write_charge(
        self,
        server_round: int,
        mechanism: SampledGaussianRound,
        spent: Mapping[AccountantName, float | None],
        *,
        clip_norm: float,
        unclipped_fraction: float | None = None,
        next_clip_norm: float | None = None,
    ) -> LedgerRecord:
        p = self._config.privacy
        rdp = spent["rdp"]
        assert rdp is not None  # RDP accounts for every sampling
        is_local = p.mode == "local"
        # local: the row keeps the clients' z and no sampling; mechanism_args() rebuilds
        # local_round(z) from it
        noise_multiplier = p.noise_multiplier if is_local else mechanism.noise_multiplier
        with self._store.transaction():  # the ledger row and its event, or neither
            record = self._charge_row(
                server_round,
                mechanism,
                spent,
                noise_multiplier=noise_multiplier,
                clip_norm=clip_norm,
                unclipped_fraction=unclipped_fraction,
                next_clip_norm=next_clip_norm,
            )
        log.info(
            "round %d charged to the privacy ledger: epsilon %s",
            server_round,
            spent,
            extra={"round": server_round},
        )
        return record

    def _charge_row(
        self,
        server_round: int,
        mechanism: SampledGaussianRound,
        spent: Mapping[AccountantName, float | None],
        *,
        noise_multiplier: float,
        clip_norm: float,
        unclipped_fraction: float | None,
        next_clip_norm: float | None,
    ) -> LedgerRecord:
        p = self._config.privacy
        rdp = spent["rdp"]
        assert rdp is not None
        is_local = p.mode == "local"
        record = charge(
            self._store,
            server_round,
            mechanism="local" if is_local else "central",
            noise_multiplier=noise_multiplier,
            sampling=mechanism.sampling,
            sampling_rate=mechanism.rate,
            population=mechanism.population,
            sample_size=mechanism.sample_size,
            clip_norm=clip_norm,
            epsilon_rdp=rdp,
            epsilon_pld=spent["pld"],
            delta=p.target_delta,
            unclipped_fraction=unclipped_fraction,
            next_clip_norm=next_clip_norm,
        )
        chosen = spent.get(p.accountant)
        self._events.emit(
            ev.PrivacyCharged(
                epsilon=chosen if chosen is not None else rdp,
                accountant=p.accountant if chosen is not None else "rdp",
                epsilon_rdp=rdp,
                epsilon_pld=spent["pld"],
                budget=p.epsilon_budget,
                delta=p.target_delta,
                noise_multiplier=noise_multiplier,
                mechanism=record.mechanism,
                clip_norm=clip_norm,
                next_clip_norm=next_clip_norm,
            ),
            server_round=server_round,
        )
        return record
