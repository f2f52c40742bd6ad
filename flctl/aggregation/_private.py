"""Differential privacy around a strategy: the private mean is released, the strategy steps on it.

With ``[privacy]`` on, the round's updates never reach the configured strategy directly. The
release stage computes the one private quantity of the round, the mean of the updates'
deltas added to the base model:

- **central**: :class:`~flctl.aggregation.DpFedAvg`, the clipped deltas summed with equal
  weights over a fixed denominator, plus Gaussian noise (the ledger charges exactly this);
- **local**: :class:`~flctl.aggregation.LocalDpFedAvg`, the unweighted mean of the deltas the
  clients clipped and noised themselves.

The strategy then aggregates that mean as its round's only update. Anything computed from a
private release alone is as private as the release (post-processing), so the strategy changes
how the model moves, never the guarantee the ledger records. Only a strategy whose aggregate
depends on the updates through their mean (:attr:`Strategy.is_mean_based`) means the same
thing when given one mean; :func:`check_private` refuses the others, saying why.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.aggregation._bulyan import Bulyan
from flctl.aggregation._dpfedavg import DpFedAvg
from flctl.aggregation._fedmedian import FedMedian
from flctl.aggregation._fedtrimmedavg import FedTrimmedAvg
from flctl.aggregation._krum import MultiKrum
from flctl.aggregation._localdpfedavg import LocalDpFedAvg
from flctl.aggregation._registry import BUILTIN_STRATEGIES
from flctl.aggregation._strategy import EvaluateResult, ParamValue, Strategy, WeightedUpdate
from flctl.core.errors import ConfigError, NotEnoughUpdatesError, PrivacyError

if TYPE_CHECKING:
    import torch

__all__ = ["MEAN_UPDATE_ID", "PrivateStrategy", "check_private"]

#: The ``client_id`` of the one update the inner strategy is given: the private mean.
MEAN_UPDATE_ID = "private-mean"

#: The prefix of the task config keys the round engine reserves for the client's privacy
#: settings (``flctl.core.dp``); a strategy under privacy may not send them.
_RESERVED_PREFIX = "flctl.privacy."

#: Byzantine-robust rules: they choose, trim or rank among the individual updates.
_ROBUST: tuple[type[Strategy], ...] = (FedMedian, FedTrimmedAvg, MultiKrum, Bulyan)

_ROBUST_WHY = {
    "central": (
        "central DP releases one noised mean of the clipped updates, and a strategy can only "
        "post-process that mean (any other use of the updates is a release the ledger does "
        "not account for); a robust rule given one input has nothing to choose from, so it "
        "would protect against nothing, while clipping already bounds each client's influence "
        "on the mean"
    ),
    "local": (
        "local DP noises each update on its client with noise about as large as the update "
        "itself; a robust rule reads that noise as an attack and discards or distorts honest "
        "updates, while the noise hides the outliers it exists to find; only averaging many "
        "noised updates cancels the noise"
    ),
}
_NOT_MEAN_WHY = (
    "with privacy a strategy is given one update, the private mean of the round (central: "
    "the clipped updates' mean plus noise; local: the mean of the clients' noised updates), "
    "which means the same to it only if it aggregates through the updates' mean; it does not "
    "declare is_mean_based = True"
)


def check_private(strategy: Strategy | type[Strategy], mode: str, *, subject: str = "") -> None:
    """Refuse a strategy that cannot run under ``[privacy] mode``, saying why.

    The one rule for privacy with a strategy: with ``mode`` "off" anything goes; with
    "central" or "local" the strategy must be mean-based (:attr:`Strategy.is_mean_based`:
    FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, or a custom strategy declaring
    it). Robust rules (FedMedian, FedTrimmedAvg, Krum, Multi-Krum, Bulyan) are refused even if
    they declare it.

    Args:
        strategy: The strategy, or its class.
        mode: ``[privacy] mode``: "off", "central" or "local".
        subject: What the message calls the strategy (default ``strategy 'NAME'``), such as
            ``flctl.toml: [strategy] name = "krum"``.

    Raises:
        ConfigError: The combination is unsound; the message says why, the hint what works.
        ValueError: ``mode`` is not one of the three.
    """
    if mode == "off":
        return
    if mode not in _ROBUST_WHY:
        raise ValueError(f"privacy mode must be 'off', 'central' or 'local', not {mode!r}")
    cls = strategy if isinstance(strategy, type) else type(strategy)
    is_robust = issubclass(cls, _ROBUST)
    if cls.is_mean_based and not is_robust:
        return
    name = getattr(cls, "name", cls.__name__)
    why = _ROBUST_WHY[mode] if is_robust else _NOT_MEAN_WHY
    mean_based = ", ".join(n for n, c in sorted(BUILTIN_STRATEGIES.items()) if c.is_mean_based)
    raise ConfigError(
        f'{subject or f"strategy {name!r}"} cannot be combined with [privacy] mode = "{mode}": '
        f"{why}",
        hint=f"with [privacy] on, use a mean-based strategy ({mean_based}), or a strategy_fn "
        'whose strategy sets is_mean_based = True; for a robust one, set [privacy] mode = "off" '
        '(docs/strategies.md, "Privacy with a strategy")',
    )


class PrivateStrategy(Strategy):
    """Runs a strategy under differential privacy: it steps on the round's private mean.

    :meth:`aggregate` first writes the release, ``release.aggregate(base, updates, ...)``
    (central: DP-FedAvg's clipped and noised mean; local: the mean of the clients' noised
    deltas; both added to ``base``, integer tensors from ``base``), to a temporary file beside
    ``out``, then lets ``inner`` aggregate that one file (weight 1, client id
    :data:`MEAN_UPDATE_ID`) into ``out``. So:

    - with FedAvg or FedProx the model is the release's, bit for bit (the mean of one update is
      that update; a ``-0.0`` coordinate, which only an underflow can produce, comes out
      ``0.0``);
    - a server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad) steps on the noised
      pseudo-gradient ``release - base``, and keeps its state as without privacy.

    Everything else is the inner strategy's: :meth:`configure_fit` (FedProx's ``proximal_mu``
    reaches the clients; the ``flctl.privacy.*`` keys the round engine sends are refused),
    :meth:`configure_evaluate`, :meth:`aggregate_evaluate`, :meth:`state_dict` and
    :meth:`load_state_dict`. The wrapper holds no state of its own, so the engine may build one
    per round around the strategy it keeps (the release's clip norm and denominator can change
    from round to round).

    Memory: the release's (one accumulator plus one tensor) then the inner strategy's over one
    update; disk: one more model-sized file while a round is aggregated.

    Example:
        ```python
        strategy = PrivateStrategy(FedAdam(), DpFedAvg(clip_norm=1.0, noise_multiplier=1.1,
                                                       denominator=30.0))
        strategy.aggregate(base, updates, out)   # FedAdam's step on the noised mean
        ```

    Args:
        inner: The strategy to run; must be mean-based (:func:`check_private`).
        release: The private mean: :class:`DpFedAvg` (central DP) or :class:`LocalDpFedAvg`
            (local DP).

    Raises:
        ConfigError: ``inner`` cannot run under privacy (:func:`check_private`).
        TypeError: ``release`` is neither of the two.
    """

    name = "private"
    summary = "a mean-based strategy stepping on the round's differentially private mean"

    def __init__(self, inner: Strategy, release: DpFedAvg | LocalDpFedAvg) -> None:
        if not isinstance(release, DpFedAvg | LocalDpFedAvg):
            raise TypeError(f"release must be a DpFedAvg or a LocalDpFedAvg, not {release!r}")
        self.mode = "local" if isinstance(release, LocalDpFedAvg) else "central"
        check_private(inner, self.mode)
        self.inner = inner
        self.release = release
        self.has_released = False
        """Whether the last :meth:`aggregate` computed the private mean (even if ``inner``
        failed after it): a round that released it is charged."""

    @property
    def last_unclipped_fraction(self) -> float | None:
        """Central DP with adaptive clipping: the last round's noised unclipped fraction."""
        if isinstance(self.release, DpFedAvg):
            return self.release.last_unclipped_fraction
        return None

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the inner strategy's model from the round's private mean to ``out``.

        Raises:
            NotEnoughUpdatesError: ``updates`` is empty (nothing is released).
            InconsistentUpdatesError: An update does not match ``base`` (nothing is released),
                or the inner strategy's state does not match the model.
        """
        self.has_released = False
        if not updates:
            raise NotEnoughUpdatesError("no updates to aggregate")
        # beside the output: same file system, and removed whatever happens
        handle, name = tempfile.mkstemp(prefix=".private-mean-", dir=out.parent)
        os.close(handle)
        mean = Path(name)
        try:
            self.release.aggregate(base, updates, mean)
            self.has_released = True
            self.inner.aggregate(base, [WeightedUpdate(mean, 1, MEAN_UPDATE_ID)], out)
        finally:
            mean.unlink(missing_ok=True)

    def configure_fit(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        """The inner strategy's fit config.

        Raises:
            PrivacyError: It sets a ``flctl.privacy.*`` key, which the round engine reserves
                for the client's privacy settings.
        """
        answer = self.inner.configure_fit(server_round, clients)
        for client_id, entries in answer.items():
            reserved = sorted(k for k in entries if str(k).startswith(_RESERVED_PREFIX))
            if reserved:
                raise PrivacyError(
                    f"strategy {getattr(self.inner, 'name', type(self.inner).__name__)!r}: "
                    f"configure_fit gave {client_id!r} {', '.join(reserved)}: the "
                    f"{_RESERVED_PREFIX}* keys carry the coordinator's privacy settings"
                )
        return answer

    def configure_evaluate(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        """The inner strategy's evaluate config."""
        return self.inner.configure_evaluate(server_round, clients)

    def aggregate_evaluate(
        self, results: Sequence[EvaluateResult]
    ) -> tuple[float, dict[str, float]]:
        """The inner strategy's (loss, metrics)."""
        return self.inner.aggregate_evaluate(results)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner strategy's state."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Give the inner strategy its state back."""
        self.inner.load_state_dict(state)
