"""The Client API a task implements: parameters in, parameters out, in plain PyTorch."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Client", "ConfigValue", "Metrics", "Parameters"]

ConfigValue = bool | int | float | str
Parameters = dict[str, "torch.Tensor"]
Metrics = dict[str, float]


class Client(abc.ABC):
    """One data owner's side of the federation.

    flctl calls ``fit`` once per round the client is selected for, with the round's global model
    and the ``[task]`` config, and uploads what it returns. Tensors are keyed by state-dict name;
    return them on any device (flctl moves them to the CPU before encoding).

    Example:
        ```python
        class MyClient(Client):
            def __init__(self, model, loader):
                self.model, self.loader = model, loader

            def get_parameters(self):
                return self.model.state_dict()

            def fit(self, parameters, config):
                self.model.load_state_dict(parameters)
                n = train(self.model, self.loader, epochs=int(config["local_epochs"]))
                return self.model.state_dict(), n, {"train_loss": last_loss}
        ```
    """

    @abc.abstractmethod
    def get_parameters(self) -> Parameters:
        """Return the current model parameters (a state dict)."""

    @abc.abstractmethod
    def fit(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[Parameters, int, Metrics]:
        """Train from ``parameters`` on local data.

        Returns:
            The new parameters, the number of examples trained on (the FedAvg weight), and
            metrics (finite floats).
        """

    def evaluate(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[float, int, Metrics]:
        """Evaluate ``parameters`` on local data.

        Returns:
            Loss, number of examples evaluated, metrics. The default says evaluation is not
            supported by raising ``NotImplementedError``.
        """
        raise NotImplementedError("this client does not evaluate")
