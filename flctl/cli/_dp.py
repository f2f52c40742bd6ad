"""``flctl dp``: privacy calculators, and the budget a project's job has spent.

``dp epsilon`` and ``dp plan`` need no project; ``dp budget`` reads the project's privacy ledger
from its state database (no coordinator needed).

All answer with dp-accounting's own accountants (flctl.privacy), imported only when a command
runs, so that ``flctl --help`` stays fast.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from flctl.cli._options import ConfigOpt, JsonOpt
from flctl.cli._output import Output, command
from flctl.core.errors import ConfigError, PrivacyError

if TYPE_CHECKING:
    from flctl.core import Config
    from flctl.privacy import AccountantName
    from flctl.store import LedgerRecord

__all__ = ["budget_document", "dp_app", "epsilon_document", "plan_document"]

dp_app = typer.Typer(
    help="Differential privacy: epsilon, noise plans and the budget.",
    no_args_is_help=True,
)

_ACCOUNTANTS = ("rdp", "pld")
_SAMPLINGS = ("poisson", "fixed")

AccountantOpt = Annotated[
    str,
    typer.Option(
        metavar="[rdp|pld]",
        help="rdp (Renyi DP) or pld (privacy loss distributions; poisson sampling only).",
    ),
]
SamplingOpt = Annotated[
    str,
    typer.Option(
        metavar="[poisson|fixed]",
        help="poisson (each client with --sampling-rate) or fixed (--sample-size of "
        "--population; rdp only).",
    ),
]
SamplingRateOpt = Annotated[
    float | None,
    typer.Option(help="Poisson: the probability that a client takes part in a round, in (0, 1]."),
]
PopulationOpt = Annotated[
    int | None, typer.Option(help="Fixed: the number of clients that may ever take part.")
]
SampleSizeOpt = Annotated[int | None, typer.Option(help="Fixed: the number of clients per round.")]
RoundsOpt = Annotated[int, typer.Option(help="Number of rounds.")]
DeltaOpt = Annotated[float, typer.Option(help="The delta epsilon holds at, in (0, 1).")]


def _check_options(
    *,
    rounds: int,
    delta: float,
    accountant: str,
    sampling: str,
    sampling_rate: float | None,
    population: int | None,
    sample_size: int | None,
    min_rounds: int,
) -> dict[str, Any]:
    """Check the options a user typed and name the one that is wrong (a ConfigError)."""
    if accountant not in _ACCOUNTANTS:
        raise ConfigError(f"--accountant must be rdp or pld, not {accountant!r}")
    if sampling not in _SAMPLINGS:
        raise ConfigError(f"--sampling must be poisson or fixed, not {sampling!r}")
    if rounds < min_rounds:
        raise ConfigError(f"--rounds must be at least {min_rounds}, not {rounds}")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be strictly between 0 and 1, not {delta!r}")
    mechanism: dict[str, Any] = {"sampling": sampling}
    if sampling == "poisson":
        if sampling_rate is None:
            raise ConfigError("--sampling-rate is required with --sampling poisson")
        if not 0 < sampling_rate <= 1:
            raise ConfigError(f"--sampling-rate must be in (0, 1], not {sampling_rate!r}")
        if population is not None or sample_size is not None:
            raise ConfigError(
                "--population and --sample-size go with --sampling fixed",
                hint="with poisson sampling, give only --sampling-rate",
            )
        mechanism["sampling_rate"] = sampling_rate
        return mechanism
    if accountant == "pld":
        raise ConfigError(
            "--sampling fixed needs --accountant rdp: dp-accounting accounts fixed-size "
            "sampling only with RDP, under replace-one adjacency",
        )
    if sample_size is None or population is None:
        raise ConfigError("--sampling fixed needs --population and --sample-size")
    if sample_size < 1:
        raise ConfigError(f"--sample-size must be at least 1, not {sample_size}")
    if population < sample_size:
        raise ConfigError(
            f"--population ({population}) must be at least --sample-size ({sample_size})"
        )
    if sampling_rate is not None and not math.isclose(
        sampling_rate, sample_size / population, rel_tol=1e-9
    ):
        raise ConfigError(
            f"--sampling-rate {sampling_rate!r} contradicts --sample-size / --population "
            f"({sample_size}/{population})",
            hint="with --sampling fixed, leave --sampling-rate out",
        )
    mechanism.update(population=population, sample_size=sample_size)
    return mechanism


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise PrivacyError(f"{what} is unbounded for these settings")
    return value


def epsilon_document(
    *,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
    sampling_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
) -> dict[str, Any]:
    """What ``flctl dp epsilon --json`` prints: epsilon after ``rounds`` rounds, and the inputs.

    Raises:
        ConfigError: An option is missing, out of range or contradicts another.
        PrivacyError: The accountant could not give a finite epsilon.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise ConfigError(f"--noise-multiplier must be greater than 0, not {noise_multiplier!r}")
    mechanism = _check_options(
        rounds=rounds,
        delta=delta,
        accountant=accountant,
        sampling=sampling,
        sampling_rate=sampling_rate,
        population=population,
        sample_size=sample_size,
        min_rounds=0,
    )
    from flctl.privacy import SampledGaussianRound, epsilon

    name = cast("AccountantName", accountant)
    eps = epsilon(noise_multiplier, rounds, delta, accountant=name, **mechanism)
    described = SampledGaussianRound(noise_multiplier, **mechanism)
    return {
        "epsilon": _finite(eps, "epsilon"),
        "accountant": accountant,
        **described.to_dict(),
        "adjacency": described.adjacency,
        "rounds": rounds,
        "delta": delta,
    }


def plan_document(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    accountant: str = "rdp",
    sampling: str = "poisson",
    sampling_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
) -> dict[str, Any]:
    """What ``flctl dp plan --json`` prints: the smallest noise multiplier meeting the target.

    Raises:
        ConfigError: An option is missing, out of range or contradicts another.
        PrivacyError: No noise multiplier in flctl's planning range meets the target.
    """
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError(f"--epsilon must be greater than 0, not {epsilon!r}")
    mechanism = _check_options(
        rounds=rounds,
        delta=delta,
        accountant=accountant,
        sampling=sampling,
        sampling_rate=sampling_rate,
        population=population,
        sample_size=sample_size,
        min_rounds=1,
    )
    from flctl.privacy import PLAN_TOLERANCE, SampledGaussianRound, plan_noise
    from flctl.privacy import epsilon as epsilon_of

    name = cast("AccountantName", accountant)
    z = plan_noise(epsilon, delta, rounds, accountant=name, **mechanism)
    achieved = epsilon_of(z, rounds, delta, accountant=name, **mechanism)
    described = SampledGaussianRound(z, **mechanism)
    return {
        "noise_multiplier": z,
        "epsilon": _finite(achieved, "epsilon"),
        "target_epsilon": epsilon,
        "accountant": accountant,
        **{k: v for k, v in described.to_dict().items() if k != "noise_multiplier"},
        "adjacency": described.adjacency,
        "rounds": rounds,
        "delta": delta,
        "tolerance": PLAN_TOLERANCE,
    }


def budget_document(config: Config, records: list[LedgerRecord]) -> dict[str, Any]:
    """What ``flctl dp budget --json`` prints: the privacy spent by ``records`` (the ledger).

    Epsilon is recomputed from the charged rounds at the project's ``privacy.target_delta``,
    under each accountant that can account for them (PLD: Poisson sampling only; None
    otherwise). ``rounds_left`` counts further rounds at the current ``[privacy]`` settings
    within ``epsilon_budget`` (None with ``mode = "off"``). With ``mode = "local"`` a round is
    each client's own release, unsampled (``flctl.privacy.local_round``); with adaptive
    clipping the clip norm shown is the one the next round starts from.

    Raises:
        PrivacyError: The ledger mixes adjacency notions with the current settings.
    """
    from flctl.privacy import ACCOUNTANTS, Accountant, SampledGaussianRound, local_round

    p = config.privacy
    accountant = Accountant(
        p.target_delta, [SampledGaussianRound(**r.mechanism_args()) for r in records]
    )
    mechanism = None
    described: dict[str, Any] | None = None
    clip_norm = p.clip_norm
    if p.adaptive_clip:
        clip_norm = next(
            (r.next_clip_norm for r in reversed(records) if r.next_clip_norm is not None),
            p.clip_norm,
        )
    if p.mode == "local":
        mechanism = local_round(p.noise_multiplier)
        described = {
            "noise_multiplier": p.noise_multiplier,
            "sampling": "none",
            "sampling_rate": 1.0,
            "sensitivity": "2 * clip_norm",
        }
    elif p.mode == "central":
        if p.sampling == "fixed":
            mechanism = SampledGaussianRound(
                p.noise_multiplier, "fixed", population=p.population, sample_size=p.sample_size
            )
        else:
            mechanism = SampledGaussianRound(p.noise_multiplier, "poisson", p.sampling_rate)
        described = mechanism.to_dict()
    usable = set(accountant.accountants)
    if mechanism is not None and mechanism.adjacency == "replace_one":
        usable.discard("pld")
    per: dict[str, dict[str, Any] | None] = {}
    for name in ACCOUNTANTS:
        if name not in usable:
            per[name] = None
            continue
        spent = accountant.epsilon(name)
        per[name] = {
            "epsilon_spent": spent,
            "remaining": max(p.epsilon_budget - spent, 0.0) if p.mode != "off" else None,
            "rounds_left": (
                None
                if mechanism is None
                else accountant.rounds_left(mechanism, p.epsilon_budget, name)
            ),
        }
    return {
        "mode": p.mode,
        "mechanism": None if described is None else described | {"clip_norm": clip_norm},
        "delta": p.target_delta,
        "budget": p.epsilon_budget if p.mode != "off" else None,
        "enforced_by": p.accountant if p.mode != "off" else None,
        "rounds_charged": len(records),
        "last_round": records[-1].round_id if records else None,
        "accountants": per,
    }


def _render(out: Output, title: str, document: dict[str, Any]) -> None:
    """The document's fields as key / value rows (:meth:`Output.pairs`)."""
    rows = [
        (key, f"{value:.6g}" if isinstance(value, float) else str(value))
        for key, value in document.items()
    ]
    out.pairs(rows, title=title)


@dp_app.command("epsilon")
@command()
def dp_epsilon(
    noise_multiplier: Annotated[
        float, typer.Option(help="Noise std divided by the clipping norm (z), > 0.")
    ],
    rounds: RoundsOpt,
    delta: DeltaOpt,
    sampling_rate: SamplingRateOpt = None,
    accountant: AccountantOpt = "rdp",
    sampling: SamplingOpt = "poisson",
    population: PopulationOpt = None,
    sample_size: SampleSizeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Compute the epsilon a number of rounds spends.

    Epsilon at --delta after --rounds rounds of client-level DP-FedAvg (dp-accounting).
    """
    document = epsilon_document(
        noise_multiplier=noise_multiplier,
        rounds=rounds,
        delta=delta,
        accountant=accountant,
        sampling=sampling,
        sampling_rate=sampling_rate,
        population=population,
        sample_size=sample_size,
    )
    out = Output(json_mode=json_output)
    if json_output:
        out.json(document)
        return
    _render(out, f"epsilon after {rounds} rounds ({accountant})", document)


@dp_app.command("plan")
@command()
def dp_plan(
    epsilon: Annotated[float, typer.Option(help="The target epsilon, > 0.")],
    delta: DeltaOpt,
    rounds: RoundsOpt,
    sampling_rate: SamplingRateOpt = None,
    accountant: AccountantOpt = "rdp",
    sampling: SamplingOpt = "poisson",
    population: PopulationOpt = None,
    sample_size: SampleSizeOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Find the noise multiplier for a target epsilon.

    The smallest noise multiplier that keeps epsilon within --epsilon after --rounds rounds.
    """
    document = plan_document(
        epsilon=epsilon,
        delta=delta,
        rounds=rounds,
        accountant=accountant,
        sampling=sampling,
        sampling_rate=sampling_rate,
        population=population,
        sample_size=sample_size,
    )
    out = Output(json_mode=json_output)
    if json_output:
        out.json(document)
        return
    _render(out, f"noise for epsilon {epsilon:g} after {rounds} rounds ({accountant})", document)


@dp_app.command("budget")
@command()
def dp_budget(config_path: ConfigOpt = None, json_output: JsonOpt = False) -> None:
    """Show the privacy budget spent and left.

    The privacy this project's job has spent, the budget left and the rounds left (its ledger).
    """
    from flctl.cli._common import load_project
    from flctl.core.errors import NotFoundError
    from flctl.store import ledger, open_store

    config = load_project(config_path)
    records = []
    try:
        store = open_store(config, read_only=True)
    except NotFoundError:
        pass  # nothing spent yet; a store that was lost is refused (StoreLostError)
    else:
        with store:
            records = ledger(store)
    document = budget_document(config, records)
    out = Output(json_mode=json_output)
    if json_output:
        out.json(document)
        return
    flat: dict[str, Any] = {
        k: v for k, v in document.items() if k not in ("mechanism", "accountants")
    }
    for name, numbers in document["accountants"].items():
        if numbers is None:
            flat[f"{name}"] = "n/a for this sampling"
            continue
        for key, value in numbers.items():
            flat[f"{name} {key.replace('_', ' ')}"] = "-" if value is None else value
    _render(out, "privacy budget", flat)
