"""FedAdam: Adam as the server optimizer over the clients' pseudo-gradient."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flctl.aggregation._fedopt import AdaptiveOptimizer, moment_params, optimizer_params

if TYPE_CHECKING:
    import torch

__all__ = ["FedAdam"]


class FedAdam(AdaptiveOptimizer):
    """Adaptive federated optimization with Adam on the server (Reddi et al. 2021).

    With ``delta = mean - x`` (the updates' num_examples-weighted mean minus the round's
    model ``x``) and ``t`` the round, counted from 1 by this strategy::

        m = beta_1 * m + (1 - beta_1) * delta
        v = beta_2 * v + (1 - beta_2) * delta**2
        eta_t = eta * sqrt(1 - beta_2**(t + 1)) / (1 - beta_1**(t + 1))
        x = x + eta_t * m / (sqrt(v) + tau)

    ``m`` and ``v`` start at zero. The defaults and the bias-corrected rate ``eta_t`` (Kingma
    & Ba's step size, with exponent ``t + 1``) are Flower's, so that a run moved from Flower
    gives the same models. The paper's Algorithm 2 has no bias correction
    (``x = x + eta * m / (sqrt(v) + tau)``); Flower counts ``t`` from its server round, flctl
    from the first round this strategy aggregated (the same when it ran from round 1).
    ``eta_l`` is recorded only: clients train with the task's own learning rate.

    State: ``"m.<tensor>"`` and ``"v.<tensor>"`` (float32) and ``"step"`` (``t``).
    Memory: the state (two float32 copies of the model) plus one accumulator and one tensor
    being read, whatever the number of clients.
    """

    name = "fedadam"
    summary = "server-side Adam on the mean update (Reddi et al. 2021)"
    params = (
        *optimizer_params(eta=0.1, eta_l=0.1, tau=1e-3),
        *moment_params(beta_1=0.9, beta_2=0.99),
    )
    slots = ("m", "v")

    def __init__(
        self,
        eta: float = 0.1,
        eta_l: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def step(
        self, x: torch.Tensor, mean: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> torch.Tensor:
        """One Adam step of one tensor; see the class docstring."""
        delta = mean - x
        m = self.first_moment(delta, state)
        v = delta.square().mul_(1.0 - self.beta_2)
        if "v" in state:
            v = state["v"].to(delta.dtype) * self.beta_2 + v
        state["v"] = v
        eta_t = (
            self.eta * math.sqrt(1.0 - self.beta_2 ** (t + 1.0)) / (1.0 - self.beta_1 ** (t + 1.0))
        )
        step: torch.Tensor = x + eta_t * m / (v.sqrt() + self.tau)
        return step
