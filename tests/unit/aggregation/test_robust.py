"""Whole-round robust strategies: median, trimmed mean, Krum, Multi-Krum, Bulyan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.aggregation import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flctl.core.errors import NotEnoughUpdatesError
from flctl.tensors import load_parameters
from tests.unit.aggregation.conftest import federation

pytestmark = pytest.mark.usefixtures("one_thread")


stacks = st.builds(
    lambda k, shape, seed: np.random.default_rng(seed).normal(size=(k, *shape)).astype(np.float32),
    st.integers(1, 9),
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    st.integers(0, 10_000),
)


@settings(max_examples=40, deadline=None)
@given(stack=stacks, encoding=st.sampled_from(["full", "delta"]))
def test_median_equals_numpy(
    tmp_path_factory: pytest.TempPathFactory, stack: np.ndarray, encoding: str
) -> None:
    folder = tmp_path_factory.mktemp("median")
    base, updates = federation(folder, stack, encoding=encoding)
    FedMedian().aggregate(base, updates, folder / "out")
    got = load_parameters(folder / "out")["w"].numpy()
    np.testing.assert_allclose(got, np.median(stack, axis=0), rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(stack=stacks, beta=st.floats(0.0, 0.49))
def test_trimmed_mean_equals_numpy(
    tmp_path_factory: pytest.TempPathFactory, stack: np.ndarray, beta: float
) -> None:
    folder = tmp_path_factory.mktemp("trimmed")
    base, updates = federation(folder, stack)
    FedTrimmedAvg(beta=beta).aggregate(base, updates, folder / "out")
    k = stack.shape[0]
    cut = int(beta * k)
    want = np.sort(stack, axis=0)[cut : k - cut].mean(axis=0)
    got = load_parameters(folder / "out")["w"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_trimming_everything_is_refused(tmp_path: Path) -> None:
    base, updates = federation(tmp_path, np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(NotEnoughUpdatesError, match="trims 2 of 4 updates from each end"):
        FedTrimmedAvg(beta=0.5).aggregate(base, updates, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@st.composite
def attacked(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Honest updates near one point and f attackers far from it (n >= 2f + 3)."""
    f = draw(st.integers(0, 3))
    honest = draw(st.integers(f + 3, f + 6))
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    center = rng.normal(size=6)
    good = center + 0.01 * rng.normal(size=(honest, 6))
    bad = center + draw(st.floats(10.0, 1e4)) * rng.normal(size=(f, 6)) + 50.0
    stack = np.concatenate([good, bad]).astype(np.float32)
    order = rng.permutation(len(stack))
    return stack[order], f


@settings(max_examples=40, deadline=None)
@given(case=attacked())
def test_krum_picks_an_honest_update(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[np.ndarray, int]
) -> None:
    stack, f = case
    folder = tmp_path_factory.mktemp("krum")
    base, updates = federation(folder, stack)
    strategy = Krum(num_malicious=f)
    strategy.aggregate(base, updates, folder / "out")
    out = load_parameters(folder / "out")
    chosen = int(out["n"])
    # the result is the chosen update itself, and that update is honest (near the others)
    np.testing.assert_array_equal(out["w"].numpy(), stack[chosen])
    assert np.abs(stack[chosen] - np.median(stack, axis=0)).max() < 1.0
    assert strategy.last_selected == [f"c{chosen}"]


@settings(max_examples=30, deadline=None)
@given(case=attacked())
def test_multikrum_keeps_only_honest_updates(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[np.ndarray, int]
) -> None:
    stack, f = case
    folder = tmp_path_factory.mktemp("multikrum")
    base, updates = federation(folder, stack)
    honest = [i for i in range(len(stack)) if np.abs(stack[i] - np.median(stack, 0)).max() < 1]
    strategy = MultiKrum(num_malicious=f, to_keep=len(honest))
    strategy.aggregate(base, updates, folder / "out")
    assert sorted(strategy.last_selected) == sorted(f"c{i}" for i in honest)
    got = load_parameters(folder / "out")["w"].numpy()
    np.testing.assert_allclose(got, stack[honest].mean(axis=0), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(f=st.integers(0, 2), seed=st.integers(0, 10_000), scale=st.floats(10.0, 1e4))
def test_bulyan_stays_within_the_honest_values(
    tmp_path_factory: pytest.TempPathFactory, f: int, seed: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    n = 4 * f + 3 + int(rng.integers(0, 3))
    honest = rng.normal(size=(n - f, 5))
    attackers = scale * rng.normal(size=(f, 5)) + 50.0
    stack = np.concatenate([honest, attackers]).astype(np.float32)
    folder = tmp_path_factory.mktemp("bulyan")
    base, updates = federation(folder, stack)
    Bulyan(num_malicious=f).aggregate(base, updates, folder / "out")
    got = load_parameters(folder / "out")["w"].numpy()
    assert (got >= honest.min(axis=0) - 1e-5).all() and (got <= honest.max(axis=0) + 1e-5).all()


def numpy_bulyan(stack: np.ndarray, f: int) -> np.ndarray:
    """Flower's Bulyan in NumPy: Multi-Krum's theta best, then the beta nearest the median."""
    n = len(stack)
    flat = stack.reshape(n, -1).astype(np.float64)
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    closest = max(1, n - f - 2)
    scores = [np.sort(np.delete(distances[i], i))[:closest].sum() for i in range(n)]
    theta, beta = n - 2 * f, n - 4 * f
    selected = stack[np.argsort(scores, kind="stable")[:theta]]
    median = np.median(selected, axis=0)
    nearest = np.argsort(np.abs(selected - median), axis=0, kind="stable")[:beta]
    return np.asarray(np.take_along_axis(selected, nearest, axis=0).mean(axis=0))


@settings(max_examples=30, deadline=None)
@given(f=st.integers(0, 2), extra=st.integers(0, 3), seed=st.integers(0, 10_000))
def test_bulyan_equals_numpy(
    tmp_path_factory: pytest.TempPathFactory, f: int, extra: int, seed: int
) -> None:
    stack = np.random.default_rng(seed).normal(size=(4 * f + 3 + extra, 3, 2)).astype(np.float32)
    folder = tmp_path_factory.mktemp("bulyan")
    base, updates = federation(folder, stack)
    Bulyan(num_malicious=f).aggregate(base, updates, folder / "out")
    got = load_parameters(folder / "out")["w"].numpy()
    np.testing.assert_allclose(got, numpy_bulyan(stack, f), rtol=1e-5, atol=1e-6)


def test_bulyan_refuses_a_round_smaller_than_4f_plus_3(tmp_path: Path) -> None:
    base, updates = federation(tmp_path, np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(NotEnoughUpdatesError, match=r"needs at least 4 \* 2 \+ 3 = 11 updates"):
        Bulyan(num_malicious=2).aggregate(base, updates, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    Bulyan(num_malicious=1).aggregate(base, updates, tmp_path / "out")


def test_integer_tensors_come_from_the_heaviest_kept_update(tmp_path: Path) -> None:
    stack = np.array([[0.0], [0.1], [0.2], [100.0]], dtype=np.float32)
    base, updates = federation(tmp_path, stack, weights=[1, 5, 2, 9])
    MultiKrum(num_malicious=1, to_keep=3).aggregate(base, updates, tmp_path / "out")
    # update 3 is the heaviest, but it is the outlier: not kept
    assert int(load_parameters(tmp_path / "out")["n"]) == 1
    FedMedian().aggregate(base, updates, tmp_path / "median")
    assert int(load_parameters(tmp_path / "median")["n"]) == 3
