"""FedProx's proximal term, for a task's training loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["proximal_term"]


def proximal_term(
    model: torch.nn.Module, global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """Return ``mu / 2 * ||w - w_global||^2`` over the model's trainable parameters.

    Added to the training loss, it keeps local training near the round's global model (the
    FedProx strategy sends ``mu`` as ``proximal_mu`` in the fit config). Gradients flow to
    ``model``'s parameters only; buffers (BatchNorm statistics) and frozen parameters do not
    count.

    Example:
        ```python
        mu = float(config.get("proximal_mu", 0.0))
        start = {n: t.detach().clone() for n, t in model.state_dict().items()}
        ...
        loss = loss_fn(model(x), y) + proximal_term(model, start, mu)
        ```

    Args:
        model: The model being trained.
        global_params: The round's global parameters by name (as ``fit`` received them);
            moved to each parameter's device and dtype.
        mu: The proximal weight (0 gives a zero term).

    Raises:
        KeyError: A trainable parameter of ``model`` is missing from ``global_params``.
    """
    import torch

    terms = [
        (param - global_params[name].detach().to(param.device, param.dtype)).square().sum()
        for name, param in model.named_parameters()
        if param.requires_grad
    ]
    if not terms:
        return torch.zeros(())
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total * (mu / 2.0)
