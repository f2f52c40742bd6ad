"""FedAdagrad: Adagrad as the server optimizer over the clients' pseudo-gradient."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flctl.aggregation._fedopt import AdaptiveOptimizer, optimizer_params

if TYPE_CHECKING:
    import torch

__all__ = ["FedAdagrad"]


class FedAdagrad(AdaptiveOptimizer):
    """Adaptive federated optimization with Adagrad on the server (Reddi et al. 2021).

    With ``delta = mean - x`` (the updates' num_examples-weighted mean minus the round's
    model ``x``)::

        v = v + delta**2
        x = x + eta * delta / (sqrt(v) + tau)

    ``v`` starts at zero. The paper's Algorithm 2 allows a momentum ``beta_1``; Flower fixes
    it at 0 (the step uses ``delta`` itself), and so does flctl. Defaults are Flower's (eta
    0.1, eta_l 0.1, tau 0.001). ``eta_l`` is recorded only: clients train with the task's own
    learning rate.

    State: ``"v.<tensor>"`` (float32) and ``"step"``.
    Memory: the state (one float32 copy of the model) plus one accumulator and one tensor
    being read, whatever the number of clients.
    """

    name = "fedadagrad"
    summary = "server-side Adagrad on the mean update (Reddi et al. 2021)"
    params = optimizer_params(eta=0.1, eta_l=0.1, tau=1e-3)
    slots = ("v",)

    def __init__(self, eta: float = 0.1, eta_l: float = 0.1, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=0.0, beta_2=0.0, tau=tau)

    def step(
        self, x: torch.Tensor, mean: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> torch.Tensor:
        """One Adagrad step of one tensor; see the class docstring."""
        delta = mean - x
        v = delta.square()
        if "v" in state:
            v = state["v"].to(delta.dtype) + v
        state["v"] = v
        return x + self.eta * delta / (v.sqrt() + self.tau)
