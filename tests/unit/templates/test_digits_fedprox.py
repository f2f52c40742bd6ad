"""The digits template under the fedprox strategy: the proximal term when proximal_mu > 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flctl.core import TaskContext, load_task

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "digits"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> ModuleType:
    return load_task(TEMPLATE / "task.py")


def fit(task: ModuleType, config: dict[str, object]) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    start = task.build_model(TaskContext(role="coordinator", seed=0)).state_dict()
    context = TaskContext(  # type: ignore[call-arg]
        role="client", seed=0, device="cpu", client_id="c1", partition_id=0, num_partitions=3
    )
    params, _, metrics = task.client_fn(context).fit(
        {n: t.clone() for n, t in start.items()}, {"local_epochs": 1, **config}
    )
    return {n: params[n] - start[n] for n in start}, metrics


def drift(delta: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in delta.values())


def test_proximal_mu_zero_trains_as_fedavg_and_mu_keeps_the_model_near(task: ModuleType) -> None:
    plain, plain_metrics = fit(task, {})
    zero, zero_metrics = fit(task, {"proximal_mu": 0.0})
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    assert plain_metrics == zero_metrics
    prox, prox_metrics = fit(task, {"proximal_mu": 1.0})
    again, _ = fit(task, {"proximal_mu": 1.0})
    assert all(torch.equal(prox[n], again[n]) for n in prox)  # still deterministic
    assert drift(prox) < drift(plain)
    assert set(prox_metrics) == set(plain_metrics)
