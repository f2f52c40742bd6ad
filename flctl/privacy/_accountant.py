"""The privacy accountant: epsilon of the sampled Gaussian mechanism over rounds.

Every number comes from Google's dp-accounting library: its ``RdpAccountant`` (default orders)
and its ``PLDAccountant`` (value discretisation ``PLD_DISCRETIZATION``). One round of
client-level DP-FedAvg is one :class:`SampledGaussianRound`:

- Poisson sampling (each client takes part with probability ``q``):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under add/remove-one adjacency, RDP or PLD.
- Fixed-size sampling (``M`` clients out of ``N``, without replacement):
  ``SampledWithoutReplacementDpEvent(N, M, GaussianDpEvent(z))``, which dp-accounting accounts
  only with RDP, under replace-one adjacency.

T identical rounds are ``SelfComposedDpEvent(event, T)``. dp-accounting is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flctl.core.errors import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "AccountantName",
    "Adjacency",
    "MAX_PLAN_NOISE",
    "MIN_PLAN_NOISE",
    "PLAN_TOLERANCE",
    "PLD_DISCRETIZATION",
    "SAMPLINGS",
    "SampledGaussianRound",
    "Sampling",
    "epsilon",
    "plan_noise",
    "rounds_left",
]

AccountantName = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed"]
Adjacency = Literal["add_or_remove_one", "replace_one"]

ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "pld")
SAMPLINGS: tuple[Sampling, ...] = ("poisson", "fixed")
PLD_DISCRETIZATION = 1e-4
"""``value_discretization_interval`` of every PLD accountant (dp-accounting's default)."""
PLAN_TOLERANCE = 1e-3
"""Relative tolerance of :func:`plan_noise`: ``z * (1 - PLAN_TOLERANCE)`` misses the target."""
MIN_PLAN_NOISE = 0.3
"""The smallest noise multiplier :func:`plan_noise` considers (below it PLD is very slow and
epsilon is in the tens for any realistic sampling rate)."""
MAX_PLAN_NOISE = 1e6
"""The largest noise multiplier :func:`plan_noise` considers."""
_MAX_ROUNDS_LEFT = 100_000
_FIXED_RATE_RTOL = 1e-9


@dataclass(frozen=True)
class SampledGaussianRound:
    """One round of the sampled Gaussian mechanism, as the accountant charges it.

    Args:
        noise_multiplier: Noise std divided by the clipping norm (``z``), greater than 0.
        sampling: ``"poisson"`` (needs ``sampling_rate``) or ``"fixed"`` (needs ``population``
            and ``sample_size``).
        sampling_rate: Poisson: the probability ``q`` that a client takes part, in (0, 1].
            Fixed: optional; when given it must equal ``sample_size / population``.
        population: Fixed: the number of clients that may ever take part (``N``).
        sample_size: Fixed: the number of clients in each round (``M``), 1 <= M <= N.

    Raises:
        PrivacyError: A value is missing, out of range or inconsistent.
    """

    noise_multiplier: float
    sampling: Sampling = "poisson"
    sampling_rate: float | None = None
    population: int | None = None
    sample_size: int | None = None

    def __post_init__(self) -> None:
        z = self.noise_multiplier
        if not _is_number(z) or not math.isfinite(z) or z <= 0:
            raise PrivacyError(f"noise_multiplier must be a finite number > 0, not {z!r}")
        if self.sampling == "poisson":
            q = self.sampling_rate
            if q is None:
                raise PrivacyError("poisson sampling needs a sampling_rate in (0, 1]")
            if not _is_number(q) or not 0 < q <= 1:
                raise PrivacyError(f"sampling_rate must be in (0, 1], not {q!r}")
            if self.population is not None or self.sample_size is not None:
                raise PrivacyError(
                    "population and sample_size describe fixed-size sampling; "
                    "poisson sampling takes only a sampling_rate"
                )
            return
        if self.sampling != "fixed":
            raise PrivacyError(f"sampling must be 'poisson' or 'fixed', not {self.sampling!r}")
        n, m = self.population, self.sample_size
        if n is None or m is None:
            raise PrivacyError("fixed-size sampling needs a population and a sample_size")
        if not _is_int(m) or m < 1:
            raise PrivacyError(f"sample_size must be an integer >= 1, not {m!r}")
        if not _is_int(n) or n < m:
            raise PrivacyError(f"population must be an integer >= sample_size ({m}), not {n!r}")
        if self.sampling_rate is not None and not math.isclose(
            self.sampling_rate, m / n, rel_tol=_FIXED_RATE_RTOL
        ):
            raise PrivacyError(
                f"sampling_rate {self.sampling_rate!r} contradicts sample_size / population "
                f"= {m}/{n} = {m / n!r}",
                hint="with fixed-size sampling, leave the sampling rate out",
            )

    @property
    def rate(self) -> float:
        """The fraction of clients in a round: ``q``, or ``sample_size / population``."""
        if self.sampling == "poisson":
            assert self.sampling_rate is not None  # checked in __post_init__
            return float(self.sampling_rate)
        assert self.population is not None and self.sample_size is not None
        return self.sample_size / self.population

    @property
    def adjacency(self) -> Adjacency:
        """The neighbouring relation the round is accounted under (client level)."""
        return "add_or_remove_one" if self.sampling == "poisson" else "replace_one"

    def dp_event(self) -> Any:
        """The dp-accounting ``DpEvent`` of this round."""
        import dp_accounting

        gaussian = dp_accounting.GaussianDpEvent(float(self.noise_multiplier))
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.rate, gaussian)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, gaussian
        )

    def to_dict(self) -> dict[str, Any]:
        """The round as a JSON-ready object (for the ledger and ``--json`` output)."""
        out: dict[str, Any] = {
            "noise_multiplier": self.noise_multiplier,
            "sampling": self.sampling,
            "sampling_rate": self.rate,
        }
        if self.sampling == "fixed":
            out["population"] = self.population
            out["sample_size"] = self.sample_size
        return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_delta(delta: float) -> None:
    if not _is_number(delta) or not 0 < delta < 1:
        raise PrivacyError(f"delta must be strictly between 0 and 1, not {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be 'rdp' or 'pld', not {accountant!r}")


def _check_rounds(rounds: int, name: str = "rounds") -> None:
    if not _is_int(rounds) or rounds < 0:
        raise PrivacyError(f"{name} must be an integer >= 0, not {rounds!r}")


class _DropNonConvergence(logging.Filter):
    """Drop dp-accounting's "failed to converge ... Excluding this order" log lines.

    RDP at a fractional order sometimes does not converge; dp-accounting then leaves that order
    out, and epsilon (a minimum over the remaining orders) is still a valid bound. The lines
    are noise on a user's terminal, so they stay out of it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_filter_installed = False


def _install_log_filter() -> None:
    global _filter_installed
    if not _filter_installed:
        logging.getLogger("absl").addFilter(_DropNonConvergence())
        _filter_installed = True


def _new_accountant(accountant: AccountantName, adjacency: Adjacency) -> Any:
    """A fresh dp-accounting accountant of the given kind and neighbouring relation."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    _install_log_filter()
    relation = (
        NeighboringRelation.ADD_OR_REMOVE_ONE
        if adjacency == "add_or_remove_one"
        else NeighboringRelation.REPLACE_ONE
    )
    if accountant == "rdp":
        return RdpAccountant(neighboring_relation=relation)
    if adjacency == "replace_one":
        raise PrivacyError(
            "the PLD accountant cannot account for fixed-size sampling",
            hint="dp-accounting accounts fixed-size sampling only with RDP (replace-one "
            "adjacency): use accountant rdp, or poisson sampling",
        )
    return PLDAccountant(
        neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION
    )


_Run = tuple[SampledGaussianRound, int]


def _runs(rounds: Iterable[SampledGaussianRound]) -> list[_Run]:
    """Group consecutive identical rounds: T equal rounds compose as one SelfComposedDpEvent."""
    out: list[_Run] = []
    for mechanism in rounds:
        if out and out[-1][0] == mechanism:
            out[-1] = (mechanism, out[-1][1] + 1)
        else:
            out.append((mechanism, 1))
    return out


def _mixed_adjacency() -> PrivacyError:
    return PrivacyError(
        "rounds with poisson and fixed-size sampling cannot be composed: they are accounted "
        "under different adjacency notions (add/remove-one and replace-one)"
    )


def _adjacency_of(runs: Sequence[_Run]) -> Adjacency | None:
    kinds = {m.adjacency for m, count in runs if count > 0}
    if len(kinds) > 1:
        raise _mixed_adjacency()
    return kinds.pop() if kinds else None


@functools.lru_cache(maxsize=256)
def _rdp_curve(mechanism: SampledGaussianRound) -> tuple[Any, Any]:
    """(orders, RDP of one round at each order), from dp-accounting's ``RdpAccountant``.

    One round's curve costs about 0.1 s (the fractional orders), and RDP composes by adding
    curves, exactly as ``RdpAccountant.compose`` does (``rdp += count * curve``): caching the
    curve makes a ledger, a plan or a rounds-left search cheap without changing any number.
    """
    acc = _new_accountant("rdp", mechanism.adjacency)
    acc.compose(mechanism.dp_event())
    orders, curve = acc.orders, acc.rdp
    orders.setflags(write=False)
    curve.setflags(write=False)
    return orders, curve


def _rdp_total(runs: Sequence[_Run]) -> tuple[Any, Any]:
    """(orders, RDP curve) of every run composed; the runs must not be empty."""
    total: Any = None
    orders: Any = None
    for mechanism, count in runs:
        orders, curve = _rdp_curve(mechanism)
        total = count * curve if total is None else total + count * curve
    return orders, total


def _epsilon(runs: Sequence[_Run], delta: float, accountant: AccountantName) -> float:
    """Epsilon at ``delta`` of the runs composed in order (0.0 for none)."""
    runs = [(m, count) for m, count in runs if count > 0]
    adjacency = _adjacency_of(runs)
    if adjacency is None:
        return 0.0
    if accountant == "rdp":
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        orders, rdp = _rdp_total(runs)
        return float(compute_epsilon(orders, rdp, delta)[0])  # = RdpAccountant.get_epsilon
    import dp_accounting

    acc = _new_accountant(accountant, adjacency)
    for mechanism, count in runs:
        acc.compose(dp_accounting.SelfComposedDpEvent(mechanism.dp_event(), count))
    return float(acc.get_epsilon(delta))


def epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    *,
    accountant: AccountantName = "rdp",
    sampling: Sampling = "poisson",
    sampling_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the sampled Gaussian mechanism.

    Example:
        ```python
        epsilon(1.1, 100, 1e-5, sampling_rate=0.1)                  # RDP, poisson
        epsilon(1.1, 100, 1e-5, sampling_rate=0.1, accountant="pld")
        epsilon(1.1, 100, 1e-5, sampling="fixed", population=1000, sample_size=100)
        ```

    Args:
        noise_multiplier: Noise std divided by the clipping norm (``z``).
        rounds: Number of rounds (``T``), each one a fresh sample; 0 gives 0.0.
        delta: The delta epsilon is reported at, in (0, 1).
        accountant: ``"rdp"`` or ``"pld"`` (PLD: Poisson sampling only).
        sampling: ``"poisson"`` or ``"fixed"``; see :class:`SampledGaussianRound`.
        sampling_rate: Poisson: ``q`` in (0, 1].
        population: Fixed: ``N``.
        sample_size: Fixed: ``M``.

    Returns:
        Epsilon, as dp-accounting's accountant of that kind reports it.

    Raises:
        PrivacyError: A value is out of range, or the accountant cannot account for the sampling.
    """
    mechanism = SampledGaussianRound(
        noise_multiplier, sampling, sampling_rate, population, sample_size
    )
    _check_rounds(rounds)
    _check_delta(delta)
    _check_accountant(accountant)
    return _epsilon([(mechanism, rounds)], delta, accountant)


def plan_noise(
    epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float | None = None,
    accountant: AccountantName = "rdp",
    *,
    sampling: Sampling = "poisson",
    population: int | None = None,
    sample_size: int | None = None,
    tolerance: float = PLAN_TOLERANCE,
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``epsilon``.

    Epsilon falls as the noise multiplier grows, so a bisection on ``z`` finds it: the result
    ``z`` meets the target, and ``z * (1 - tolerance)`` does not (up to the accountant's own
    numerical noise).

    Example:
        ```python
        z = plan_noise(8.0, 1e-5, 100, 0.1)  # about 0.994 under RDP
        ```

    Args:
        epsilon: The target epsilon, greater than 0.
        delta: The delta the target holds at, in (0, 1).
        rounds: Number of rounds, at least 1.
        sampling_rate: Poisson: ``q`` in (0, 1].
        accountant: ``"rdp"`` or ``"pld"``.
        sampling: ``"poisson"`` or ``"fixed"``.
        population: Fixed: ``N``.
        sample_size: Fixed: ``M``.
        tolerance: Relative width of the final bracket, in (0, 0.1].

    Returns:
        The noise multiplier, within ``[MIN_PLAN_NOISE, MAX_PLAN_NOISE]``.

    Raises:
        PrivacyError: A value is out of range, or the target needs a noise multiplier outside
            ``[MIN_PLAN_NOISE, MAX_PLAN_NOISE]``.
    """
    if not _is_number(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
        raise PrivacyError(f"the target epsilon must be a finite number > 0, not {epsilon!r}")
    _check_delta(delta)
    _check_rounds(rounds)
    if rounds < 1:
        raise PrivacyError("rounds must be at least 1 to plan the noise for them")
    _check_accountant(accountant)
    if not _is_number(tolerance) or not 0 < tolerance <= 0.1:
        raise PrivacyError(f"tolerance must be in (0, 0.1], not {tolerance!r}")

    def round_with(z: float) -> SampledGaussianRound:
        return SampledGaussianRound(z, sampling, sampling_rate, population, sample_size)

    round_with(1.0)  # validate the sampling arguments once, before any accounting

    def meets(z: float) -> bool:
        return _epsilon([(round_with(z), rounds)], delta, accountant) <= epsilon

    lo, hi = _bracket(meets, epsilon)
    # Invariant: meets(hi) and not meets(lo). Geometric midpoints suit a relative tolerance.
    while hi - lo > tolerance * hi:
        mid = math.sqrt(lo * hi)
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _bracket(meets: Callable[[float], bool], target: float) -> tuple[float, float]:
    """Return (lo, hi) with ``meets(hi)`` and not ``meets(lo)``, doubling or halving from 1."""
    z = 1.0
    if meets(z):
        while True:
            lower = z / 2
            if lower < MIN_PLAN_NOISE:
                if meets(MIN_PLAN_NOISE):
                    raise PrivacyError(
                        f"epsilon {target!r} is met even with noise multiplier {MIN_PLAN_NOISE}, "
                        "the smallest flctl plans for",
                        hint="any noise multiplier at or above it meets the target; a tighter "
                        "target (smaller epsilon) gives a meaningful plan",
                    )
                return MIN_PLAN_NOISE, z
            if not meets(lower):
                return lower, z
            z = lower
    while True:
        upper = z * 2
        if upper > MAX_PLAN_NOISE:
            raise PrivacyError(
                f"epsilon {target!r} needs a noise multiplier above {MAX_PLAN_NOISE:g}",
                hint="allow a larger epsilon, fewer rounds or a smaller sampling rate",
            )
        if meets(upper):
            return z, upper
        z = upper


def _rounds_left(
    spent: Sequence[_Run],
    mechanism: SampledGaussianRound,
    epsilon_budget: float,
    delta: float,
    accountant: AccountantName,
    max_rounds: int,
) -> int:
    """The most rounds of ``mechanism`` that, after ``spent``, keep epsilon within budget."""
    if not _is_number(epsilon_budget) or not math.isfinite(epsilon_budget) or epsilon_budget < 0:
        raise PrivacyError(f"epsilon_budget must be a finite number >= 0, not {epsilon_budget!r}")
    _check_delta(delta)
    _check_accountant(accountant)
    if not _is_int(max_rounds) or max_rounds < 1:
        raise PrivacyError(f"max_rounds must be an integer >= 1, not {max_rounds!r}")
    _adjacency_of([*spent, (mechanism, 1)])
    rdp_left = _last_fitting(_rdp_fits(spent, mechanism, epsilon_budget, delta), 1, max_rounds)
    if accountant == "rdp":
        return rdp_left

    # PLD is orders of magnitude slower than RDP, and usually the tighter of the two: its
    # search starts from RDP's answer, which is close, instead of from one round.
    def fits(k: int) -> bool:
        return _epsilon([*spent, (mechanism, k)], delta, accountant) <= epsilon_budget

    return _last_fitting(fits, rdp_left, max_rounds)


def _last_fitting(fits: Callable[[int], bool], start: int, max_rounds: int) -> int:
    """The largest ``k`` in [0, max_rounds] with ``fits(k)``, searching from ``start``.

    ``fits`` must be monotone (true up to some count, false after it): epsilon only grows with
    the rounds. Gallops away from ``start`` by doubling steps, then bisects.
    """
    start = min(max(start, 1), max_rounds)
    if not fits(start):
        good, bad = 0, start
    else:
        good, step = start, max(1, start // 8)
        while True:
            probe = good + step
            if probe > max_rounds:
                if good == max_rounds or fits(max_rounds):
                    return max_rounds
                bad = max_rounds
                break
            if not fits(probe):
                bad = probe
                break
            good, step = probe, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _rdp_fits(
    spent: Sequence[_Run], mechanism: SampledGaussianRound, budget: float, delta: float
) -> Callable[[int], bool]:
    """RDP composes by adding RDP curves: k more rounds cost k times one round's curve."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders, step = _rdp_curve(mechanism)
    spent = [(m, count) for m, count in spent if count > 0]
    # no "0 * step" for an empty ledger: the curve may hold inf at large orders, and 0 * inf
    # is NaN, which compute_epsilon then reads as "fits" at every k
    base = _rdp_total(spent)[1] if spent else None

    def fits(k: int) -> bool:
        total = k * step if base is None else base + k * step
        return float(compute_epsilon(orders, total, delta)[0]) <= budget

    return fits


def rounds_left(
    epsilon_budget: float,
    delta: float,
    noise_multiplier: float,
    *,
    accountant: AccountantName = "rdp",
    sampling: Sampling = "poisson",
    sampling_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
    rounds_done: int = 0,
    max_rounds: int = _MAX_ROUNDS_LEFT,
) -> int:
    """How many more rounds at these settings keep epsilon at ``delta`` within the budget.

    Args:
        epsilon_budget: The epsilon not to exceed.
        delta: The delta epsilon is measured at.
        noise_multiplier: ``z`` of every round, past and future.
        accountant: ``"rdp"`` or ``"pld"``.
        sampling: ``"poisson"`` or ``"fixed"``.
        sampling_rate: Poisson: ``q``.
        population: Fixed: ``N``.
        sample_size: Fixed: ``M``.
        rounds_done: Rounds already charged at the same settings.
        max_rounds: The search stops here: a result equal to it means "at least this many".

    Returns:
        The number of further rounds, 0 when not even one fits.

    Raises:
        PrivacyError: A value is out of range.
    """
    mechanism = SampledGaussianRound(
        noise_multiplier, sampling, sampling_rate, population, sample_size
    )
    _check_rounds(rounds_done, "rounds_done")
    spent = [(mechanism, rounds_done)] if rounds_done else []
    return _rounds_left(spent, mechanism, epsilon_budget, delta, accountant, max_rounds)


class Accountant:
    """A ledger of charged rounds, and the epsilon they add up to under RDP and PLD.

    Each round may have its own noise multiplier and sampling rate; the ledger composes them
    in order. Its epsilon is a pure function of the ledger, so a coordinator can rebuild it
    from its ``dp_ledger`` table after a restart.

    Example:
        ```python
        acc = Accountant(delta=1e-5)
        step = SampledGaussianRound(1.1, sampling_rate=0.1)
        if acc.epsilon_after(step) > budget:
            raise BudgetExhaustedError(...)
        acc.charge(step)
        acc.epsilons()  # {"rdp": 0.53..., "pld": 0.39...}
        ```

    Args:
        delta: The delta every epsilon is reported at, in (0, 1).
        ledger: Rounds already charged, oldest first.

    Raises:
        PrivacyError: ``delta`` is out of range, or the ledger mixes adjacency notions.
    """

    def __init__(self, delta: float, ledger: Iterable[SampledGaussianRound] = ()) -> None:
        _check_delta(delta)
        self.delta = float(delta)
        self._ledger: list[SampledGaussianRound] = []
        self._cache: dict[AccountantName, tuple[int, float]] = {}
        for mechanism in ledger:
            self.charge(mechanism)

    @property
    def ledger(self) -> tuple[SampledGaussianRound, ...]:
        """The charged rounds, oldest first."""
        return tuple(self._ledger)

    @property
    def rounds(self) -> int:
        """How many rounds were charged."""
        return len(self._ledger)

    @property
    def adjacency(self) -> Adjacency | None:
        """The ledger's neighbouring relation, or None while it is empty."""
        return self._ledger[0].adjacency if self._ledger else None

    @property
    def accountants(self) -> tuple[AccountantName, ...]:
        """The accountants that can account for this ledger (PLD: Poisson sampling only)."""
        return ("rdp",) if self.adjacency == "replace_one" else ACCOUNTANTS

    def charge(self, mechanism: SampledGaussianRound) -> None:
        """Add one round to the ledger.

        Raises:
            PrivacyError: Its adjacency differs from the ledger's.
        """
        if not isinstance(mechanism, SampledGaussianRound):
            raise PrivacyError(f"cannot charge {mechanism!r}: not a SampledGaussianRound")
        if self.adjacency is not None and mechanism.adjacency != self.adjacency:
            raise _mixed_adjacency()
        self._ledger.append(mechanism)

    def epsilon(self, accountant: AccountantName = "rdp") -> float:
        """Epsilon at :attr:`delta` spent by the ledger (0.0 while empty).

        Raises:
            PrivacyError: The accountant cannot account for the ledger (PLD, fixed sampling).
        """
        _check_accountant(accountant)
        cached = self._cache.get(accountant)
        if cached is not None and cached[0] == len(self._ledger):
            return cached[1]
        value = _epsilon(_runs(self._ledger), self.delta, accountant)
        self._cache[accountant] = (len(self._ledger), value)
        return value

    def epsilons(self) -> dict[AccountantName, float | None]:
        """Epsilon under each accountant; None where one cannot account for the ledger."""
        return {a: (self.epsilon(a) if a in self.accountants else None) for a in ACCOUNTANTS}

    def epsilon_after(
        self, mechanism: SampledGaussianRound, rounds: int = 1, accountant: AccountantName = "rdp"
    ) -> float:
        """Epsilon the ledger would reach after ``rounds`` more rounds of ``mechanism``.

        Nothing is charged: a coordinator calls it before a round starts, to refuse a round
        that would exceed the budget.
        """
        _check_rounds(rounds)
        _check_accountant(accountant)
        return _epsilon([*_runs(self._ledger), (mechanism, rounds)], self.delta, accountant)

    def rounds_left(
        self,
        mechanism: SampledGaussianRound,
        epsilon_budget: float,
        accountant: AccountantName = "rdp",
        *,
        max_rounds: int = _MAX_ROUNDS_LEFT,
    ) -> int:
        """How many more rounds of ``mechanism`` keep the ledger within ``epsilon_budget``.

        A result equal to ``max_rounds`` means "at least this many".
        """
        return _rounds_left(
            _runs(self._ledger), mechanism, epsilon_budget, self.delta, accountant, max_rounds
        )
