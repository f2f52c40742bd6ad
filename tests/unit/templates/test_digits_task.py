"""Unit tests of the digits template's task module (templates/digits/task.py)."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from flctl.client import Client
from flctl.core import TaskContext, load_task

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "digits"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Train with one thread, as each client process does (and no oversubscription here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> ModuleType:
    return load_task(TEMPLATE / "task.py")


@pytest.fixture(scope="module")
def task_config() -> dict[str, object]:
    text = (TEMPLATE / "flctl.toml").read_text(encoding="utf-8")
    text = text.replace("{{ project_name }}", "t").replace("{{ seed }}", "0")
    return dict(tomllib.loads(text)["task"])


def client_context(partition_id: int = 0, **overrides: object) -> TaskContext:
    fields: dict[str, object] = {
        "role": "client",
        "seed": 0,
        "device": "cpu",
        "client_id": f"c{partition_id + 1}",
        "partition_id": partition_id,
        "num_partitions": 3,
        "partitioning": "iid",
        "alpha": 0.5,
        **overrides,
    }
    return TaskContext(**fields)  # type: ignore[arg-type]


def initial_parameters(task: ModuleType, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = task.build_model(TaskContext(role="coordinator", seed=seed))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- data ----------------------------------------------------------------------------------------


def test_split_sizes_and_ranges(task: ModuleType) -> None:
    x_train, y_train, x_test, y_test = task.load_data(0)
    assert x_train.shape == (1437, 1, 8, 8) and y_train.shape == (1437,)
    assert x_test.shape == (360, 1, 8, 8) and y_test.shape == (360,)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_train)) == set(range(10))


def test_split_is_deterministic_by_seed(task: ModuleType) -> None:
    task.load_data.cache_clear()
    first = task.load_data(0)
    task.load_data.cache_clear()
    again = task.load_data(0)
    other = task.load_data(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])
    assert task.load_data(0) is task.load_data(0)  # cached


def test_iid_partitions_are_disjoint_and_cover_train(task: ModuleType) -> None:
    _, y_train, _, _ = task.load_data(0)
    parts = [
        task.partition_indices(y_train, num_partitions=3, partition_id=i, seed=0) for i in range(3)
    ]
    assert [len(p) for p in parts] == [479, 479, 479]
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged) == 1437
    again = task.partition_indices(y_train, num_partitions=3, partition_id=1, seed=0)
    np.testing.assert_array_equal(parts[1], again)


@pytest.mark.parametrize(("num_partitions", "alpha"), [(3, 0.5), (3, 0.05), (10, 0.1), (50, 0.1)])
def test_dirichlet_partitions_are_disjoint_and_non_empty(
    task: ModuleType, num_partitions: int, alpha: float
) -> None:
    _, y_train, _, _ = task.load_data(0)
    parts = [
        task.partition_indices(
            y_train,
            num_partitions=num_partitions,
            partition_id=i,
            partitioning="dirichlet",
            alpha=alpha,
            seed=0,
        )
        for i in range(num_partitions)
    ]
    assert min(len(p) for p in parts) >= min(task.MIN_PARTITION_SIZE, 1437 // num_partitions)
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged) == 1437


def test_dirichlet_is_skewed(task: ModuleType) -> None:
    _, y_train, _, _ = task.load_data(0)
    iid = task.partition_indices(y_train, num_partitions=3, partition_id=0, seed=0)
    skewed = task.partition_indices(
        y_train, num_partitions=3, partition_id=0, partitioning="dirichlet", alpha=0.1, seed=0
    )

    def spread(indices: np.ndarray) -> float:
        counts = np.bincount(y_train[indices], minlength=10) / len(indices)
        return float(counts.max() - counts.min())

    assert spread(skewed) > spread(iid)


@pytest.mark.parametrize("partition_id", [-1, 3, 7])
def test_out_of_range_partition_id(task: ModuleType, partition_id: int) -> None:
    with pytest.raises(ValueError, match=repr(partition_id)):
        task.client_fn(client_context(partition_id))


def test_unknown_partitioning(task: ModuleType) -> None:
    with pytest.raises(ValueError, match="'shards'"):
        task.client_fn(client_context(0, partitioning="shards"))


# -- model ---------------------------------------------------------------------------------------


def test_build_model_output_shape(task: ModuleType) -> None:
    model = task.build_model(TaskContext(role="coordinator"))
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    assert sum(p.numel() for p in model.parameters()) < 100_000  # sent every round


# -- client --------------------------------------------------------------------------------------


def test_hyperparameter_defaults_match_template_config(
    task: ModuleType, task_config: dict[str, object]
) -> None:
    assert task.DEFAULTS == task_config


def test_fit_returns_updated_parameters(task: ModuleType, task_config: dict[str, object]) -> None:
    client = task.client_fn(client_context(1))
    assert isinstance(client, Client)
    params = initial_parameters(task)
    new, num_examples, metrics = client.fit(params, {**task_config, "server_round": 1})

    assert list(new) == list(params)
    for name, tensor in new.items():
        assert tensor.shape == params[name].shape and tensor.dtype == params[name].dtype
        assert tensor.device.type == "cpu"
    assert num_examples == 479
    assert set(metrics) == {"train_loss", "train_accuracy"}
    for value in metrics.values():
        assert type(value) is float and math.isfinite(value)
    assert 0.0 <= metrics["train_accuracy"] <= 1.0
    assert any(not torch.equal(new[k], params[k]) for k in params)


def test_fit_is_deterministic_and_uses_defaults(task: ModuleType) -> None:
    params = initial_parameters(task)
    a = task.client_fn(client_context(0)).fit(params, {"local_epochs": 1})
    b = task.client_fn(client_context(0)).fit(params, {"local_epochs": 1})
    c = task.client_fn(client_context(0)).fit(params, {"local_epochs": 1, "server_round": 2})
    assert all(torch.equal(a[0][k], b[0][k]) for k in params)
    assert a[2] == b[2]
    assert any(not torch.equal(a[0][k], c[0][k]) for k in params)


def test_client_evaluate(task: ModuleType) -> None:
    client = task.client_fn(client_context(2))
    loss, n, metrics = client.evaluate(initial_parameters(task), {})
    assert type(loss) is float and math.isfinite(loss)
    # its share of the 360 held-out test images, not its 479 training images
    assert n == 120
    assert set(metrics) == {"accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0


def test_client_evaluate_uses_a_held_out_share_no_client_trains_on(task: ModuleType) -> None:
    shards = [task.load_test_partition(client_context(i)) for i in range(3)]
    _, _, x_test, _ = task.load_data(0)
    # the shards are disjoint and cover the test images
    assert sum(len(y) for _, y in shards) == len(x_test) == 360
    rows = {x.tobytes() for xs, _ in shards for x in xs}
    assert rows == {x.tobytes() for x in x_test}
    assert [len(y) for _, y in shards] == [120, 120, 120]


# -- server evaluation ---------------------------------------------------------------------------


def test_server_evaluate(task: ModuleType) -> None:
    loss, metrics = task.server_evaluate(initial_parameters(task), TaskContext(role="coordinator"))
    assert type(loss) is float and math.isfinite(loss)
    assert set(metrics) == {"accuracy", "loss"}
    assert all(type(v) is float for v in metrics.values())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["loss"] == loss


def test_local_training_improves_server_accuracy(
    task: ModuleType, task_config: dict[str, object]
) -> None:
    server = TaskContext(role="coordinator")
    params = initial_parameters(task)
    _, before = task.server_evaluate(params, server)
    client = task.client_fn(client_context(0))
    for server_round in (1, 2):
        params, _, _ = client.fit(params, {**task_config, "server_round": server_round})
    _, after = task.server_evaluate(params, server)
    assert after["accuracy"] > before["accuracy"] + 0.3
