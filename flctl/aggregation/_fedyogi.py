"""FedYogi: Yogi as the server optimizer over the clients' pseudo-gradient."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flctl.aggregation._fedopt import AdaptiveOptimizer, moment_params, optimizer_params

if TYPE_CHECKING:
    import torch

__all__ = ["FedYogi"]


class FedYogi(AdaptiveOptimizer):
    """Adaptive federated optimization with Yogi on the server (Reddi et al. 2021).

    With ``delta = mean - x`` (the updates' num_examples-weighted mean minus the round's
    model ``x``)::

        m = beta_1 * m + (1 - beta_1) * delta
        v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)
        x = x + eta * m / (sqrt(v) + tau)

    ``m`` and ``v`` start at zero; there is no bias correction. This is the paper's Algorithm
    2, with Flower's defaults (eta 0.01, eta_l 0.0316, beta_1 0.9, beta_2 0.99, tau 0.001).
    ``eta_l`` is recorded only: clients train with the task's own learning rate.

    State: ``"m.<tensor>"`` and ``"v.<tensor>"`` (float32) and ``"step"``.
    Memory: the state (two float32 copies of the model) plus one accumulator and one tensor
    being read, whatever the number of clients.
    """

    name = "fedyogi"
    summary = "server-side Yogi on the mean update (Reddi et al. 2021)"
    params = (
        *optimizer_params(eta=0.01, eta_l=0.0316, tau=1e-3),
        *moment_params(beta_1=0.9, beta_2=0.99),
    )
    slots = ("m", "v")

    def __init__(
        self,
        eta: float = 0.01,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def step(
        self, x: torch.Tensor, mean: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> torch.Tensor:
        """One Yogi step of one tensor; see the class docstring."""
        import torch

        delta = mean - x
        m = self.first_moment(delta, state)
        square = delta.square()
        v = state["v"].to(delta.dtype) if "v" in state else torch.zeros_like(delta)
        v = v - (1.0 - self.beta_2) * square * torch.sign(v - square)
        state["v"] = v
        return x + self.eta * m / (v.sqrt() + self.tau)
