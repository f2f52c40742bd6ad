"""Server optimizers: the round's weighted mean taken as a pseudo-gradient, and a stateful step."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from flctl.aggregation._round import open_round
from flctl.aggregation._strategy import Param, Strategy, WeightedUpdate
from flctl.core.errors import ConfigError, InconsistentUpdatesError

if TYPE_CHECKING:
    import torch

__all__ = [
    "AdaptiveOptimizer",
    "ServerOptimizer",
    "check_beta",
    "moment_params",
    "optimizer_params",
]

#: The state tensor that counts the rounds a server optimizer has aggregated.
STEP = "step"


class ServerOptimizer(Strategy):
    """Base of the strategies that step a server-side optimizer (FedAvgM, FedAdam, ...).

    Each round, the num_examples-weighted mean of the updates (FedAvg's) minus the round's
    model is the pseudo-gradient; a subclass turns the model, that mean and its per-tensor
    state into the next model (:meth:`step`). Integer tensors take the value of the
    heaviest update, as in FedAvg.

    State: one float32 tensor per floating-point model tensor and slot (``"m.<tensor>"``,
    ``"v.<tensor>"``, ...) plus ``"step"``, the number of rounds aggregated (an int64
    scalar). It is replaced only once the new model is written, so a round that fails leaves
    the strategy as it was. :meth:`state_dict` and :meth:`load_state_dict` carry it over a
    restart or a rollback, and a fresh instance given the state computes the same next model,
    bit for bit.

    Memory: the state (``len(slots)`` float32 copies of the model, old and new while a round
    is aggregated) plus one accumulator and one tensor being read.
    """

    #: The state a subclass keeps per tensor ("m", "v", "momentum").
    slots: ClassVar[tuple[str, ...]] = ()
    # the step is a function of the round's weighted mean, so it can take the private mean
    is_mean_based = True
    writes_in_order = True

    def __init__(self) -> None:
        self._state: dict[str, torch.Tensor] = {}
        self._step = 0

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> Strategy:
        """As :meth:`Strategy.from_params`; a value the constructor refuses is a ConfigError."""
        try:
            return super().from_params(values)
        except ValueError as exc:
            raise ConfigError(f"[strategy] for strategy {cls.name!r}: {exc}") from exc

    @abc.abstractmethod
    def step(
        self,
        x: torch.Tensor,
        mean: torch.Tensor,
        state: dict[str, torch.Tensor],
        t: int,
    ) -> torch.Tensor:
        """Return the next value of one tensor, setting its new ``state`` slots.

        Args:
            x: The round's model tensor (float32, float64 for float64 models).
            mean: The updates' weighted mean of that tensor (``mean - x`` is the
                pseudo-gradient), in the same dtype.
            state: The tensor's slots (float32) by slot name; empty before the first round.
                Set each slot to its new value (a new tensor; the old one may be shared).
            t: The round being aggregated, counted from 1 by this strategy.
        """

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the next model to ``out`` and advance the optimizer; see :class:`Strategy`."""
        import torch

        t = self._step + 1
        new_state: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            opened = open_round(stack, base, updates)
            self._check_state_matches(opened.specs)
            writer = opened.writer(stack, out)
            for name in opened.specs:
                if not opened.is_float(name):
                    writer.write(name, opened.read(opened.heaviest(), name))
                    continue
                x = opened.base_tensor(name)
                mean = opened.weighted_mean(name)
                slots = {s: self._state[f"{s}.{name}"] for s in self.slots if self._has(s, name)}
                value = self.step(x, mean, slots, t)
                for slot, tensor in slots.items():
                    new_state[f"{slot}.{name}"] = tensor.to(torch.float32)
                writer.write(name, value.to(opened.model_dtype(name)))
                del x, mean, value, slots
        self._state = new_state
        self._step = t

    def _has(self, slot: str, name: str) -> bool:
        return f"{slot}.{name}" in self._state

    def _check_state_matches(self, specs: Mapping[str, Any]) -> None:
        for key, tensor in self._state.items():
            name = key.split(".", 1)[1]
            spec = specs.get(name)
            if spec is None or tuple(spec.shape) != tuple(tensor.shape):
                raise InconsistentUpdatesError(
                    f"strategy {self.name!r} keeps state {key!r} of shape {tuple(tensor.shape)}, "
                    f"which the model does not have "
                    f"({'no such tensor' if spec is None else f'its shape is {spec.shape}'})"
                )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's slots per tensor and the ``step`` counter (empty before round 1)."""
        import torch

        if self._step == 0:
            return {}
        state = {key: tensor.clone() for key, tensor in self._state.items()}
        state[STEP] = torch.tensor(self._step, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take back what :meth:`state_dict` returned; an empty state starts afresh.

        Raises:
            ConfigError: The state is not this strategy's (another strategy's slots, no step
                counter, or a tensor that is not float32).
        """
        import torch

        if not state:
            self._state, self._step = {}, 0
            return
        where = f"the stored state of strategy {self.name!r}"
        step = state.get(STEP)
        if step is None or step.dim() != 0 or step.is_floating_point() or int(step) < 1:
            raise ConfigError(f"{where} has no valid {STEP!r} counter (was the strategy changed?)")
        loaded: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key == STEP:
                continue
            slot = key.split(".", 1)[0]
            if slot not in self.slots or "." not in key or tensor.dtype != torch.float32:
                raise ConfigError(
                    f"{where} has {key!r} ({tensor.dtype}), which it does not keep: it keeps "
                    f"float32 {', '.join(s + '.<tensor>' for s in self.slots) or 'nothing'} "
                    "(was the strategy changed?)"
                )
            loaded[key] = tensor.detach().to("cpu", copy=True)
        self._state, self._step = loaded, int(step)


def check_beta(name: str, value: float) -> None:
    """Refuse a decay rate outside [0, 1): 1 would never forget, nor correct its bias.

    Raises:
        ValueError: ``value`` is not in [0, 1).
    """
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), not {value!r}")


class AdaptiveOptimizer(ServerOptimizer):
    """Base of FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021): a first moment ``m``.

    ``m = beta_1 * m + (1 - beta_1) * delta`` with ``delta`` the pseudo-gradient; the
    subclass keeps the second moment ``v`` and takes the step ``x + eta * m / (sqrt(v) +
    tau)``.
    """

    def __init__(
        self, *, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float
    ) -> None:
        super().__init__()
        check_beta("beta_1", beta_1)
        check_beta("beta_2", beta_2)
        self.eta, self.eta_l, self.tau = eta, eta_l, tau
        self.beta_1, self.beta_2 = beta_1, beta_2

    def first_moment(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return and store the new first moment ``m`` of one tensor."""
        previous = state.get("m")
        m = delta * (1.0 - self.beta_1)
        if previous is not None:
            m = previous.to(delta.dtype) * self.beta_1 + m
        state["m"] = m
        return m


def optimizer_params(eta: float, eta_l: float, tau: float) -> tuple[Param, ...]:
    """The ``[strategy]`` parameters FedAdam, FedYogi and FedAdagrad share, with defaults."""
    return (
        Param("eta", eta, "server learning rate", low=0.0),
        Param(
            "eta_l",
            eta_l,
            "clients' learning rate, recorded only: the task's own setting applies",
            low=0.0,
        ),
        Param("tau", tau, "adaptivity: added to sqrt(v) in the step's denominator", low=0.0),
    )


def moment_params(beta_1: float, beta_2: float) -> tuple[Param, ...]:
    """The decay rates of the first and second moments, in [0, 1)."""
    return (
        Param("beta_1", beta_1, "decay of the first moment m, in [0, 1)", low=0.0, high=1.0),
        Param("beta_2", beta_2, "decay of the second moment v, in [0, 1)", low=0.0, high=1.0),
    )
