"""Every strategy's aggregate is bit-identical whatever order its updates arrived in.

Updates reach the coordinator in whatever order the clients finish, and floating-point sums
are not associative: ``(a + b) + c`` and ``(a + c) + b`` may differ in the last bit. A
project's seed promises the same models and metrics on every run, so the strategies sum in an
order of their own (by client id), never in the order they were given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.aggregation import DpFedAvg, FedAvg, LocalDpFedAvg, Strategy, WeightedUpdate
from flctl.tensors import encode_update, save_parameters

NUM_CLIENTS = 5

_STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": FedAvg,
    "local-dpfedavg": LocalDpFedAvg,
    # noise_multiplier 0: no noise, so only the order of the sum could change the result
    "dpfedavg": lambda: DpFedAvg(clip_norm=1e6, noise_multiplier=0.0, denominator=NUM_CLIENTS),
}


def _federation(folder: Path, encoding: str) -> tuple[Path, list[WeightedUpdate]]:
    """A base model and NUM_CLIENTS updates whose float32 sum depends on its order."""
    gen = torch.Generator().manual_seed(3)
    base = {
        "w": torch.randn(64, 64, generator=gen),
        "b": torch.randn(64, generator=gen),
        # a counter: FedAvg takes it from the heaviest update, and two updates tie for that
        "count": torch.tensor(0, dtype=torch.int64),
    }
    save_parameters(base, folder / "base")
    updates = []
    for i in range(NUM_CLIENTS):
        trained = {
            "w": base["w"] + (10.0**i) * torch.randn(64, 64, generator=gen),
            "b": base["b"] + (10.0**i) * torch.randn(64, generator=gen),
            "count": torch.tensor(100 + i, dtype=torch.int64),
        }
        path = folder / f"u{i}"
        encode_update(folder / "base", trained, path, encoding=encoding, dtype="float32")
        num_examples = 30 + 7 * min(i, 3)  # clients 3 and 4 tie as the heaviest
        updates.append(WeightedUpdate(path, num_examples, f"c{i}"))
    return folder / "base", updates


@pytest.mark.parametrize("name", sorted(_STRATEGIES))
@settings(max_examples=15, deadline=None)
@given(order=st.permutations(range(NUM_CLIENTS)))
def test_the_aggregate_does_not_depend_on_the_order_of_the_updates(
    tmp_path_factory: pytest.TempPathFactory, name: str, order: list[int]
) -> None:
    folder = tmp_path_factory.mktemp("order")
    # local DP refuses full models; the others take both encodings, and deltas for all is simplest
    base, updates = _federation(folder, "delta")
    _STRATEGIES[name]().aggregate(base, updates, folder / "in-order")
    _STRATEGIES[name]().aggregate(base, [updates[i] for i in order], folder / "permuted")
    assert (folder / "in-order").read_bytes() == (folder / "permuted").read_bytes()


@settings(max_examples=15, deadline=None)
@given(order=st.permutations(range(NUM_CLIENTS)))
def test_fedavg_of_full_models_does_not_depend_on_their_order(
    tmp_path_factory: pytest.TempPathFactory, order: list[int]
) -> None:
    folder = tmp_path_factory.mktemp("order")
    base, updates = _federation(folder, "full")
    FedAvg().aggregate(base, updates, folder / "in-order")
    FedAvg().aggregate(base, [updates[i] for i in order], folder / "permuted")
    assert (folder / "in-order").read_bytes() == (folder / "permuted").read_bytes()


def test_dpfedavg_reports_clip_factors_in_the_order_it_was_given(tmp_path: Path) -> None:
    base, updates = _federation(tmp_path, "delta")
    strategy = DpFedAvg(clip_norm=50.0, noise_multiplier=0.0, denominator=NUM_CLIENTS)
    strategy.aggregate(base, list(reversed(updates)), tmp_path / "out")
    # the deltas grow tenfold per client: reversed, the factors rise towards 1 (unclipped)
    assert strategy.last_clip_factors == sorted(strategy.last_clip_factors)
    assert strategy.last_norms == sorted(strategy.last_norms, reverse=True)
