"""FedProx: FedAvg's aggregate, and a proximal term the clients add to their loss."""

from __future__ import annotations

from collections.abc import Sequence

from flctl.aggregation._fedavg import FedAvg
from flctl.aggregation._strategy import Param, ParamValue

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg whose clients keep near the global model (Li et al. 2020).

    The coordinator aggregates as FedAvg does, and sends every selected client
    ``proximal_mu`` in its fit config. A client adds ``proximal_mu / 2 * ||w - w_global||^2``
    to its training loss (:func:`flctl.client.proximal_term`; the digits template does so when
    ``proximal_mu > 0``), which limits how far local training drifts on non-IID data. A task
    that ignores the key trains as under FedAvg.

    Flower's FedProx sends the same weight as ``"proximal-mu"`` and defaults it to 0 (FedAvg);
    flctl's key is snake_case like every config key, and its default is 0.01, a value the
    paper's experiments use.

    Memory: as FedAvg, one accumulator plus one tensor being read.
    """

    name = "fedprox"
    summary = "FedAvg plus a proximal term on the clients (Li et al. 2020)"
    params = (
        Param(
            "proximal_mu", 0.01, "weight mu of the clients' term mu/2 ||w - w_global||^2", low=0.0
        ),
    )

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if proximal_mu < 0.0:
            raise ValueError(f"proximal_mu must be >= 0, not {proximal_mu!r}")
        self.proximal_mu = proximal_mu

    def configure_fit(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, ParamValue]]:
        """Send ``proximal_mu`` to every selected client."""
        return {client: {"proximal_mu": self.proximal_mu} for client in clients}
