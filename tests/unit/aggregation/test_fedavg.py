from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.aggregation import FedAvg, WeightedUpdate, fedavg_in_memory, strategy_for
from flctl.core.errors import ConfigError, InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import (
    TensorReader,
    UpdateReader,
    encode_update,
    load_parameters,
    save_parameters,
)


def write(path: Path, params: dict[str, torch.Tensor]) -> Path:
    save_parameters(params, path)
    return path


@st.composite
def federations(draw: st.DrawFn) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    k = draw(st.integers(1, 5))
    shapes = draw(
        st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=3)
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    models = [
        {f"t{i}": torch.randn(tuple(s), generator=gen).to(dtype) for i, s in enumerate(shapes)}
        for _ in range(k)
    ]
    weights = draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k))
    return models, weights


@settings(max_examples=40, deadline=None)
@given(fed=federations())
def test_streaming_equals_in_memory(tmp_path_factory: pytest.TempPathFactory, fed: tuple) -> None:
    models, weights = fed
    folder = tmp_path_factory.mktemp("agg")
    base = write(folder / "base", models[0])
    updates = [
        WeightedUpdate(write(folder / f"u{i}", m), w, f"c{i}")
        for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]
    FedAvg().aggregate(base, updates, folder / "out")
    got = load_parameters(folder / "out")
    want = fedavg_in_memory(models, weights)
    tol = 1e-2 if models[0]["t0"].dtype == torch.float16 else 1e-6
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.allclose(got[name].double(), want[name].double(), atol=tol, rtol=tol)


@settings(max_examples=25, deadline=None)
@given(fed=federations())
def test_identical_updates_return_that_update_and_order_does_not_matter(
    tmp_path_factory: pytest.TempPathFactory, fed: tuple
) -> None:
    models, weights = fed
    folder = tmp_path_factory.mktemp("agg")
    base = write(folder / "base", models[0])
    same = [WeightedUpdate(write(folder / f"s{i}", models[0]), w) for i, w in enumerate(weights)]
    FedAvg().aggregate(base, same, folder / "same")
    for name, tensor in load_parameters(folder / "same").items():
        assert torch.allclose(tensor.double(), models[0][name].double(), atol=1e-3)
    ups = [
        WeightedUpdate(write(folder / f"u{i}", m), w)
        for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]
    FedAvg().aggregate(base, ups, folder / "fwd")
    FedAvg().aggregate(base, list(reversed(ups)), folder / "rev")
    fwd, rev = load_parameters(folder / "fwd"), load_parameters(folder / "rev")
    for name in fwd:
        assert torch.allclose(fwd[name].double(), rev[name].double(), atol=1e-3)


ENCODINGS = st.tuples(
    st.sampled_from(["full", "delta"]), st.sampled_from(["float32", "float16", "bfloat16"])
)
# per-element rounding of each travel dtype (relative to the travelled value), docs/benchmarks.md
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@settings(max_examples=40, deadline=None)
@given(fed=federations(), encodings=st.lists(ENCODINGS, min_size=5, max_size=5))
def test_mixed_encodings_average_the_rebuilt_models(
    tmp_path_factory: pytest.TempPathFactory,
    fed: tuple[list[dict[str, torch.Tensor]], list[int]],
    encodings: list[tuple[str, str]],
) -> None:
    models, weights = fed
    folder = tmp_path_factory.mktemp("agg")
    # a base near the clients' models, as a round's start is
    base_model = {n: (t.double() + 0.5).to(t.dtype) for n, t in models[0].items()}
    base = write(folder / "base", base_model)
    updates = []
    for i, (model, weight) in enumerate(zip(models, weights, strict=True)):
        encoding, dtype = encodings[i]
        encode_update(base, model, folder / f"u{i}", encoding=encoding, dtype=dtype)
        updates.append(WeightedUpdate(folder / f"u{i}", weight, f"c{i}"))
    FedAvg().aggregate(base, updates, folder / "out")
    got = load_parameters(folder / "out")
    rebuilt = []
    with TensorReader(base) as reader:
        for update in updates:
            with UpdateReader(update.path, reader) as u:
                rebuilt.append({n: u.read(n) for n in base_model})
    want = fedavg_in_memory(rebuilt, weights)
    exact = fedavg_in_memory(models, weights)
    is_half_model = models[0]["t0"].dtype == torch.float16
    tol = 1e-2 if is_half_model else 1e-6
    total = float(sum(weights))
    for name, tensor in got.items():
        assert tensor.dtype == models[0][name].dtype
        # the streaming mean is the mean of what the coordinator rebuilt
        assert torch.allclose(tensor.double(), want[name].double(), atol=tol, rtol=tol)
        # and within the encodings' rounding of the mean of what the clients trained
        limit = torch.zeros(tensor.shape, dtype=torch.float64)
        # one encoding per client (k <= 5 clients)
        for model, weight, (encoding, dtype) in zip(models, weights, encodings, strict=False):
            travelled = model[name].double() - (
                base_model[name].double() if encoding == "delta" else 0.0
            )
            limit += (weight / total) * UNIT_ROUNDOFF.get(dtype, 0.0) * travelled.abs()
        error = (tensor.double() - exact[name].double()).abs()
        assert bool((error <= limit * 1.001 + tol * (1 + exact[name].double().abs())).all())


def test_a_delta_from_another_model_is_refused(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    stale = write(tmp_path / "stale", {"w": torch.ones(3)})
    encode_update(stale, {"w": torch.ones(3)}, tmp_path / "u", encoding="delta", dtype="float16")
    ok = WeightedUpdate(write(tmp_path / "ok", {"w": torch.ones(3)}), 1, "c1")
    with pytest.raises(InconsistentUpdatesError, match="'c2'.*not from this round's model"):
        FedAvg().aggregate(base, [ok, WeightedUpdate(tmp_path / "u", 1, "c2")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_integer_tensors_of_a_delta_update_are_its_own(tmp_path: Path) -> None:
    base_model = {"n": torch.tensor(0), "w": torch.zeros(2)}
    base = write(tmp_path / "base", base_model)
    encode_update(
        base,
        {"n": torch.tensor(9), "w": torch.full((2,), 2.0)},
        tmp_path / "b",
        encoding="delta",
        dtype="bfloat16",
    )
    a = WeightedUpdate(write(tmp_path / "a", {"n": torch.tensor(5), "w": torch.ones(2)}), 1)
    FedAvg().aggregate(base, [a, WeightedUpdate(tmp_path / "b", 3)], tmp_path / "out")
    out = load_parameters(tmp_path / "out")
    assert int(out["n"]) == 9
    assert torch.equal(out["w"], torch.full((2,), 1.75))


def test_weighting_by_num_examples(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    a = WeightedUpdate(write(tmp_path / "a", {"w": torch.full((3,), 1.0)}), 1)
    b = WeightedUpdate(write(tmp_path / "b", {"w": torch.full((3,), 4.0)}), 3)
    FedAvg().aggregate(base, [a, b], tmp_path / "out")
    assert torch.allclose(load_parameters(tmp_path / "out")["w"], torch.full((3,), 3.25))


def test_integer_tensors_come_from_the_heaviest_update(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"n": torch.tensor(0), "w": torch.zeros(1)})
    a = WeightedUpdate(write(tmp_path / "a", {"n": torch.tensor(5), "w": torch.ones(1)}), 1)
    b = WeightedUpdate(write(tmp_path / "b", {"n": torch.tensor(9), "w": torch.ones(1)}), 2)
    FedAvg().aggregate(base, [a, b], tmp_path / "out")
    assert int(load_parameters(tmp_path / "out")["n"]) == 9


def test_shape_mismatch_and_empty_refused(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    bad = WeightedUpdate(write(tmp_path / "bad", {"w": torch.zeros(4)}), 1, "c9")
    with pytest.raises(InconsistentUpdatesError, match="c9"):
        FedAvg().aggregate(base, [bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotEnoughUpdatesError):
        FedAvg().aggregate(base, [], tmp_path / "out")
    zero = WeightedUpdate(write(tmp_path / "z", {"w": torch.zeros(3)}), 0, "c0")
    with pytest.raises(InconsistentUpdatesError, match="num_examples"):
        FedAvg().aggregate(base, [zero], tmp_path / "out")


def test_strategy_for() -> None:
    assert isinstance(strategy_for("fedavg"), FedAvg)
    with pytest.raises(ConfigError, match="unknown strategy 'nope'") as refused:
        strategy_for("nope")
    assert refused.value.hint is not None and "fedavg" in refused.value.hint
