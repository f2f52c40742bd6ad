"""flctl.client.proximal_term: FedProx's mu/2 ||w - w_global||^2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flctl.client import proximal_term


def test_value_and_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    assert proximal_term(model, start, 0.5).item() == 0.0
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    num_params = sum(p.numel() for p in model.parameters())
    term = proximal_term(model, start, 0.5)
    assert term.item() == pytest.approx(0.25 * num_params)
    term.backward()
    # d/dw mu/2 ||w - w0||^2 = mu (w - w0) = 0.5 everywhere; buffers take no part
    for param in model.parameters():
        assert param.grad is not None
        assert torch.allclose(param.grad, torch.full_like(param, 0.5))


def test_frozen_parameters_and_zero_mu() -> None:
    model = nn.Linear(2, 2)
    start = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    model.bias.requires_grad_(False)
    want = 0.1 / 2 * float(model.weight.detach().square().sum())
    assert proximal_term(model, start, 0.1).item() == pytest.approx(want)
    assert proximal_term(model, start, 0.0).item() == 0.0
    with pytest.raises(KeyError):
        proximal_term(model, {}, 0.1)
