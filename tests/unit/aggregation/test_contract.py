"""The contract every built-in strategy keeps, run over each entry of BUILTIN_STRATEGIES.

- the output has the base model's tensor names, shapes and dtypes;
- an empty round raises NotEnoughUpdatesError and writes nothing;
- the state round-trips: a fresh instance given the state (through safetensors, as the
  coordinator stores it) writes the same next model as the original, bit for bit;
- the result does not depend on the order of the updates.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flctl.aggregation import BUILTIN_STRATEGIES, Strategy, WeightedUpdate, make_strategy
from flctl.core.errors import NotEnoughUpdatesError
from flctl.tensors import encode_update, read_spec, save_parameters

NUM_CLIENTS = 7
NAMES = sorted(BUILTIN_STRATEGIES)
# parameters that make a strategy do more than its defaults do (momentum, several kept, ...)
TUNED: dict[str, dict[str, object]] = {
    "fedavgm": {"server_learning_rate": 0.7, "server_momentum": 0.9},
    "multikrum": {"num_malicious": 1, "to_keep": 3},
    "krum": {"num_malicious": 1},
    "bulyan": {"num_malicious": 1},
    "fedtrimmedavg": {"beta": 0.2},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str) -> Strategy:
    return make_strategy(name, TUNED.get(name, {}))


def model(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": scale * torch.randn(4, 3, 3, generator=gen),
        "conv.bias": scale * torch.randn(4, generator=gen),
        "half": (scale * torch.randn(5, generator=gen)).to(torch.float16),
        "wide": (scale * torch.randn(2, 3, generator=gen)).to(torch.float64),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
        "empty": torch.zeros(0, 2),
    }


def federation(
    folder: Path, seed: int, encoding: str = "full", rounds: int = 1
) -> tuple[Path, list[list[WeightedUpdate]]]:
    """A base model and ``rounds`` lists of NUM_CLIENTS updates (round r from the same base)."""
    gen = torch.Generator().manual_seed(seed)
    base = model(gen)
    save_parameters(base, folder / "base")
    all_rounds = []
    for r in range(rounds):
        updates = []
        for i in range(NUM_CLIENTS):
            trained = {
                n: (t.double() + 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(
                    t.dtype
                )
                if t.is_floating_point()
                else torch.tensor(10 * r + i, dtype=t.dtype)
                for n, t in base.items()
            }
            path = folder / f"r{r}u{i}"
            encode_update(folder / "base", trained, path, encoding=encoding, dtype="float32")
            updates.append(WeightedUpdate(path, 20 + 3 * (i % 3), f"c{i}"))
        all_rounds.append(updates)
    return folder / "base", all_rounds


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("encoding", ["full", "delta"])
def test_output_has_the_base_names_shapes_and_dtypes(
    tmp_path: Path, name: str, encoding: str
) -> None:
    base, rounds = federation(tmp_path, 1, encoding)
    make(name).aggregate(base, rounds[0], tmp_path / "out")
    got, want = read_spec(tmp_path / "out"), read_spec(base)
    assert list(got) == list(want)
    for n, spec in want.items():
        assert (got[n].dtype, got[n].shape) == (spec.dtype, spec.shape)
    assert all(bool(t.isfinite().all()) for t in load_file(tmp_path / "out").values())


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_round_is_refused_and_writes_nothing(tmp_path: Path, name: str) -> None:
    base, _ = federation(tmp_path, 2)
    with pytest.raises(NotEnoughUpdatesError):
        make(name).aggregate(base, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_instance_given_the_state_writes_the_same_next_model(
    tmp_path: Path, name: str
) -> None:
    base, rounds = federation(tmp_path, 3, rounds=3)
    original = make(name)
    fresh_state = original.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in fresh_state.values())
    original.aggregate(base, rounds[0], tmp_path / "one")
    original.aggregate(base, rounds[1], tmp_path / "two")
    # stored and read back as the coordinator does: a safetensors blob
    state = original.state_dict()
    if state:
        save_file(state, tmp_path / "state")
        state = load_file(tmp_path / "state")
    restarted = make(name)
    restarted.load_state_dict(state)
    original.aggregate(base, rounds[2], tmp_path / "uninterrupted")
    restarted.aggregate(base, rounds[2], tmp_path / "restarted")
    assert (tmp_path / "uninterrupted").read_bytes() == (tmp_path / "restarted").read_bytes()
    # a rollback: the state of round one, given back, repeats round two
    rolled_back = make(name)
    rolled_back.load_state_dict(fresh_state)
    rolled_back.aggregate(base, rounds[0], tmp_path / "again-one")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "again-one").read_bytes()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5, deadline=None)
@given(order=st.permutations(range(NUM_CLIENTS)), seed=st.integers(0, 1000))
def test_the_result_does_not_depend_on_the_order_of_the_updates(
    tmp_path_factory: pytest.TempPathFactory, name: str, order: list[int], seed: int
) -> None:
    folder = tmp_path_factory.mktemp("order")
    base, rounds = federation(folder, seed, "delta", rounds=2)
    in_order, permuted = make(name), make(name)
    for r, updates in enumerate(rounds):
        in_order.aggregate(base, updates, folder / f"in-order{r}")
        permuted.aggregate(base, [updates[i] for i in order], folder / f"permuted{r}")
        assert (folder / f"in-order{r}").read_bytes() == (folder / f"permuted{r}").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_a_default_the_strategy_accepts(name: str) -> None:
    cls = BUILTIN_STRATEGIES[name]
    assert cls.summary, f"{name} has no summary"
    assert cls.__doc__ and "memory" in cls.__doc__.lower(), (
        f"{name}'s docstring states no memory bound"
    )
    strategy = make_strategy(name)
    for param in cls.params:
        assert getattr(strategy, param.name) == param.default
