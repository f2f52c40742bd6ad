"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flctl.aggregation._fedopt import ServerOptimizer
from flctl.aggregation._strategy import Param

if TYPE_CHECKING:
    import torch

__all__ = ["FedAvgM"]


class FedAvgM(ServerOptimizer):
    """Federated averaging with server momentum (Hsu et al. 2019).

    With ``g = x - mean`` (the round's model ``x`` minus the updates' num_examples-weighted
    mean: the negated update, a gradient), as PyTorch's SGD with momentum::

        b = g                          (first round)
        b = server_momentum * b + g    (later rounds)
        x = x - server_learning_rate * b

    With ``server_momentum`` 0 the step is ``x - server_learning_rate * g``; with the
    defaults (rate 1, momentum 0) the result is FedAvg's, bit for bit. These are Flower's
    conventions and defaults; the paper's momentum is the same but written
    ``v = beta * v + g``, ``x = x - v`` with the rate folded into the clients' step.

    State: ``"momentum.<tensor>"`` (float32, only with momentum) and ``"step"``.
    Memory: the state (one float32 copy of the model) plus one accumulator and one tensor
    being read, whatever the number of clients.
    """

    name = "fedavgm"
    summary = "FedAvg with server learning rate and momentum (Hsu et al. 2019)"
    params = (
        Param("server_learning_rate", 1.0, "server learning rate", low=0.0),
        Param("server_momentum", 0.0, "server momentum, in [0, 1]", low=0.0, high=1.0),
    )
    slots = ("momentum",)

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__()
        if server_learning_rate < 0.0:
            raise ValueError(f"server_learning_rate must be >= 0, not {server_learning_rate!r}")
        if not 0.0 <= server_momentum <= 1.0:
            raise ValueError(f"server_momentum must be in [0, 1], not {server_momentum!r}")
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum

    @property
    def has_server_step(self) -> bool:
        """Whether the step differs from FedAvg (a rate other than 1, or momentum)."""
        return self.server_momentum != 0.0 or self.server_learning_rate != 1.0

    def step(
        self, x: torch.Tensor, mean: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> torch.Tensor:
        """One SGD-with-momentum step of one tensor; see the class docstring."""
        if not self.has_server_step:
            return mean
        gradient = x - mean
        if self.server_momentum > 0.0:
            if "momentum" in state:
                gradient = state["momentum"].to(x.dtype) * self.server_momentum + gradient
            state["momentum"] = gradient
        return x - self.server_learning_rate * gradient
