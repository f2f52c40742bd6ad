"""The Strategy interface: how accepted updates become the next global model."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from flctl.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["EvaluateResult", "Param", "Strategy", "WeightedUpdate"]

#: A strategy parameter's value, as the ``[strategy]`` table of flctl.toml holds it.
ParamValue = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One parameter a strategy takes from the ``[strategy]`` table.

    Attributes:
        name: The key in ``[strategy]``.
        default: Its value when the table does not set it (its type is the parameter's type).
        help: One line for ``flctl strategies ls``.
        low, high: The inclusive range of a number (None: unbounded on that side).
        choices: The allowed values of a string (empty: any).
    """

    name: str
    default: ParamValue
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any, strategy: str) -> ParamValue:
        """Return ``value`` checked (ints are accepted for floats).

        Raises:
            ConfigError: Wrong type, out of range, or not one of the choices.
        """
        where = f"[strategy] {self.name} (strategy {strategy!r})"
        kind = type(self.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ConfigError(f"{where} must be a {kind.__name__}, not {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high
            ):
                low = "-inf" if self.low is None else f"{self.low:g}"
                high = "inf" if self.high is None else f"{self.high:g}"
                raise ConfigError(f"{where} is {value!r}, outside [{low}, {high}]")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{where} is {value!r}, not one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class WeightedUpdate:
    """One accepted update on disk (a safetensors file) and its aggregation weight."""

    path: Path
    num_examples: int
    client_id: str = ""


@dataclass(frozen=True)
class EvaluateResult:
    """What one client's ``evaluate`` gave for a round's new model.

    Attributes:
        client_id: The client.
        loss: Its loss (finite).
        num_examples: The examples it evaluated on, bounded as an update's weight is
            (``rounds.max_examples_per_update``, ``rounds.max_weight_share``).
        metrics: Its metrics (finite numbers).
    """

    client_id: str
    loss: float
    num_examples: int
    metrics: Mapping[str, float]


class Strategy(abc.ABC):
    """Combines a round's updates into a new model, reading them from disk.

    Implementations read updates tensor by tensor (memory-mapped safetensors) so that memory
    grows with the model, not with the number of clients.

    Example:
        ```python
        class KeepBase(Strategy):
            name = "keep-base"

            def aggregate(self, base, updates, out):
                shutil.copyfile(base, out)
        ```
    """

    name: ClassVar[str]
    #: One line for ``flctl strategies ls``.
    summary: ClassVar[str] = ""
    #: The parameters the ``[strategy]`` table may set (see :meth:`from_params`).
    params: ClassVar[tuple[Param, ...]] = ()
    #: Whether :meth:`aggregate` depends on the updates only through their num_examples-
    #: weighted mean, so that one update equal to that mean gives the same model (FedAvg,
    #: FedProx and the server optimizers do). Only such a strategy runs with ``[privacy]`` on:
    #: :class:`~flctl.aggregation.PrivateStrategy` hands it the private mean of the round as
    #: its one update. A subclass inherits the declaration; one whose ``aggregate`` is no
    #: longer a function of the mean must set it back to False.
    is_mean_based: ClassVar[bool] = False
    #: Whether :meth:`aggregate` writes ``out`` front to back, never going back (as
    #: :class:`~flctl.tensors.TensorWriter` does): the coordinator then hashes the model while
    #: it is written instead of reading it again afterwards. The built-ins do; a subclass that
    #: writes ``out`` otherwise (seeks back, rewrites a header) must set it back to False.
    writes_in_order: ClassVar[bool] = False

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> Strategy:
        """Build the strategy from ``[strategy]`` values (defaults for those not given).

        Raises:
            ConfigError: An unknown key, or a value of the wrong type or out of range.
        """
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"[strategy] has unknown key(s) {', '.join(unknown)} for strategy "
                f"{cls.name!r} (it takes: {allowed})"
            )
        checked = {
            n: p.check(values[n], cls.name) if n in values else p.default for n, p in known.items()
        }
        return cls(**checked)

    def configure_fit(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        """Extra config for each selected client's fit (client id -> config); default none.

        The round engine selects the clients; a strategy may add to what each is sent, such as
        FedProx's ``proximal_mu`` or a per-client learning rate. The task's ``[task]`` values
        are sent as well; a strategy's key wins over a task key of the same name.
        """
        return {}

    def configure_evaluate(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        """Extra config for each client asked to evaluate the round's new model; default none.

        Called with ``rounds.evaluate = "clients"`` or ``"both"``, after the round aggregated,
        with the clients whose update was accepted and that are still connected. As with
        :meth:`configure_fit`, the ``[task]`` values are sent too and a strategy's key wins.
        """
        return {}

    def aggregate_evaluate(
        self, results: Sequence[EvaluateResult]
    ) -> tuple[float, dict[str, float]]:
        """Combine the clients' evaluations of the round's new model into (loss, metrics).

        The default is the examples-weighted mean of the loss, and of each metric over the
        results that report it. Called only with at least one result.

        Example:
            ```python
            class WorstCase(FedAvg):
                def aggregate_evaluate(self, results):
                    worst = max(results, key=lambda r: r.loss)
                    return worst.loss, dict(worst.metrics)
            ```

        Raises:
            ValueError: ``results`` is empty.
        """
        if not results:
            raise ValueError("aggregate_evaluate needs at least one result")
        total = sum(r.num_examples for r in results)
        loss = sum(r.loss * r.num_examples for r in results) / total
        metrics: dict[str, float] = {}
        for key in sorted({k for r in results for k in r.metrics}):
            having = [r for r in results if key in r.metrics]
            weight = sum(r.num_examples for r in having)
            metrics[key] = sum(r.metrics[key] * r.num_examples for r in having) / weight
        return loss, metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's state between rounds (server momentum, optimizer moments); default none.

        Stored as a safetensors blob beside each committed model, so that a restart or a
        rollback (the state goes back with the weights) carries on from it.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take back what :meth:`state_dict` returned (after a restart or a rollback).

        Raises:
            ConfigError: The state does not belong to this strategy.
        """
        if state:
            raise ConfigError(
                f"strategy {self.name!r} keeps no state, but a stored state with "
                f"{len(state)} tensors was found (was the strategy changed?)"
            )

    def aggregate_mean(self, base: Path, mean: Path, out: Path) -> None:
        """Write the new model to ``out`` from the round's weighted mean (a mean-based strategy).

        Called instead of :meth:`aggregate` for a strategy that declares
        :attr:`is_mean_based`, when the round engine summed the updates as they arrived
        (incremental aggregation, :class:`~flctl.aggregation.RunningSum`): ``mean`` holds the
        updates' num_examples-weighted mean, in the model's dtypes. The default aggregates it
        as the round's one update; a strategy whose model is the mean may move ``mean`` to
        ``out`` (the file is the caller's temp file, given away).
        """
        self.aggregate(base, [WeightedUpdate(mean, 1, "mean")], out)

    @abc.abstractmethod
    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the new model to ``out`` (a safetensors file).

        Args:
            base: The round's starting model (safetensors file).
            updates: Accepted updates; their tensor names, shapes and dtypes match ``base``.
            out: Where to write the result.

        Raises:
            NotEnoughUpdatesError: ``updates`` is empty.
            InconsistentUpdatesError: An update does not match ``base``.
        """
