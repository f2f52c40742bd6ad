"""A large model for measuring flctl: a stack of Linear layers on synthetic data.

The model has about ``[task] params`` float32 parameters (``params = 125000000`` is 500 MB),
in ``depth`` square layers. Each client holds synthetic inputs and targets made from the
project's seed and its partition, and ``fit`` takes one SGD step on a small batch: the round's
time is spent moving and averaging the model, which is what this template measures.

Memory: the parameters flctl hands to ``fit`` become the model's own (``assign=True``), so a
client holds the model, its gradients and nothing more while it trains.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flctl.client import Client
from flctl.core import TaskContext


def layout(config: dict[str, object]) -> tuple[int, int]:
    """Return (depth, width) for about ``params`` parameters."""
    params = int(config.get("params", 125_000_000))  # type: ignore[call-overload]
    depth = max(1, int(config.get("depth", 8)))  # type: ignore[call-overload]
    width = max(2, int(math.sqrt(params / depth)))
    return depth, width


def build_model(context: TaskContext) -> nn.Module:
    """``depth`` Linear(width, width) layers with ReLU between them."""
    depth, width = layout(context.config)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LargeClient(Client):
    """One SGD step per round on a small synthetic batch."""

    def __init__(self, context: TaskContext) -> None:
        self.context = context
        # The model's memory is allocated lazily: flctl's parameters replace it in fit().
        with torch.device("meta"):
            self.model = build_model(context)
        _, width = layout(context.config)
        gen = torch.Generator().manual_seed(context.seed * 7919 + context.partition_id)
        batch = int(context.config.get("batch_size", 2))  # type: ignore[call-overload]
        self.x = torch.randn(batch, width, generator=gen)
        self.y = torch.randn(batch, width, generator=gen)

    def get_parameters(self) -> dict[str, torch.Tensor]:
        # Names, shapes and dtypes are what flctl needs here (for the task fingerprint).
        return self.model.state_dict()

    def fit(
        self, parameters: dict[str, torch.Tensor], config: dict[str, object]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        device = self.context.device
        self.model.load_state_dict(parameters, assign=True)
        del parameters
        self.model.to(device)
        x, y = self.x.to(device), self.y.to(device)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=float(config.get("lr", 1e-3)))  # type: ignore[arg-type]
        loss = nn.functional.mse_loss(self.model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients before flctl saves
        return self.model.state_dict(), len(x), {"train_loss": loss.item()}


def client_fn(context: TaskContext) -> Client:
    """The client a data owner runs."""
    return LargeClient(context)
