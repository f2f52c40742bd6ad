"""Properties of the robust strategies: NumPy references, and breakdown points under attack.

Each round is two small float32 tensors, "a" (2 x 3) and "b" (4), seen here as one vector of
``DIM`` coordinates. In the attacked rounds, Hypothesis draws the honest updates (a cluster
around a point), the Byzantine ones (huge values of either sign, the honest mean's opposite,
anywhere, just outside the honest range, copies of an honest update; each on its own or all
colluding at one point) and which client ids are Byzantine. Each rule is tested exactly at its
documented bound:

- fedmedian: up to ``(K - 1) // 2`` Byzantine updates (fewer than half) keep every
  coordinate within the honest values' range; one more can move it out;
- fedtrimmedavg: up to ``int(beta * K)`` Byzantine updates keep it within that range (up to
  float32 rounding of the mean); one more can move it out;
- krum, multikrum (``K = 2f + 2`` + 1): each selected update is honest or close to an honest
  one, at most ``sqrt(K - f - 2) * D`` away, D the honest updates' diameter (its score is at
  most an honest update's, ``(K - f - 2) * D**2``, and at least two of the ``K - f - 2``
  neighbours it is scored on are honest), so Byzantine updates farther than that are never
  selected; with ``to_keep <= K - f``;
- bulyan (``K = 4f + 3``): its selection keeps to the same radius, and each coordinate stays
  within the honest range widened by ``min(f, beta) / beta`` of its width on each side: the
  median of the selected values is within the honest range, each of the ``beta`` values
  nearest it is at most the range's width beyond it, and at most ``f`` of them are Byzantine.
  Bulyan's own guarantee is a bounded deviation, not the honest range itself
  (:func:`test_bulyan_may_leave_the_honest_range_by_part_of_its_width`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.stats  # type: ignore[import-untyped]
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from flctl.aggregation import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flctl.core.errors import NotEnoughUpdatesError
from flctl.tensors import load_parameters
from tests.unit.aggregation.conftest import federation

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = float(np.finfo(np.float32).eps)
#: Tensor "a" holds the first 6 coordinates (2 x 3), tensor "b" the last 4.
DIM = 10
HUGE = 1e6


def as_tensors(stack: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of DIM coordinates as the two tensors of each update."""
    return {"a": stack[:, :6].reshape(-1, 2, 3), "b": stack[:, 6:]}


def run(
    strategy: Strategy, folder: Path, stack: np.ndarray, weights: list[int] | None = None
) -> tuple[np.ndarray, int]:
    """Aggregate the rows of ``stack``; the result as DIM coordinates (float64) and counter n."""
    folder.mkdir(parents=True, exist_ok=True)
    base, updates = federation(folder, as_tensors(stack), weights=weights)
    strategy.aggregate(base, updates, folder / "out")
    out = {name: tensor.numpy() for name, tensor in load_parameters(folder / "out").items()}
    assert out["a"].dtype == out["b"].dtype == np.float32
    flat = np.concatenate([out["a"].ravel(), out["b"].ravel()])
    return flat.astype(np.float64), int(out["n"])


# ------------------------------------------------------------------------- NumPy references


@st.composite
def rounds(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """K (1..9) updates of two float32 tensors of small shapes, values of any sign and size."""
    k = draw(st.integers(1, 9))
    values = st.floats(-1e4, 1e4, width=32)
    shapes = {
        "a": draw(array_shapes(min_dims=1, max_dims=2, max_side=3)),
        "b": draw(array_shapes(min_dims=0, max_dims=1, max_side=4)),
    }
    return {n: draw(arrays(np.float32, (k, *s), elements=values)) for n, s in shapes.items()}


def weights_for(k: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 1000), min_size=k, max_size=k)


def heaviest(weights: list[int]) -> int:
    """The first update (in client-id order, here index order) with the most examples."""
    return max(range(len(weights)), key=lambda i: weights[i])


def rounding(stack: np.ndarray) -> float:
    """What float32 rounding may add to a mean of K of these values."""
    return len(stack) * EPS32 * float(np.abs(stack).max(initial=0.0)) + 1e-30


@settings(max_examples=50, deadline=None)
@given(data=st.data(), tensors=rounds())
def test_median_equals_numpy_whatever_the_weights(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, tensors: dict[str, np.ndarray]
) -> None:
    k = len(tensors["a"])
    weights = data.draw(weights_for(k))
    folder = tmp_path_factory.mktemp("median")
    base, updates = federation(folder, tensors, weights=weights)
    FedMedian().aggregate(base, updates, folder / "out")
    out = load_parameters(folder / "out")
    for name, stack in tensors.items():
        # num_examples does not weigh in: the plain median of the float64 values
        want = np.median(stack.astype(np.float64), axis=0)
        got = out[name].numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=rounding(stack))
        if k % 2:  # an odd count's median is one of the values, exactly
            np.testing.assert_array_equal(got, np.sort(stack, axis=0)[k // 2])
    assert int(out["n"]) == heaviest(weights)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), tensors=rounds(), beta=st.floats(0.0, 0.5))
def test_trimmed_mean_equals_numpy_whatever_the_weights(
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
    tensors: dict[str, np.ndarray],
    beta: float,
) -> None:
    k = len(tensors["a"])
    weights = data.draw(weights_for(k))
    folder = tmp_path_factory.mktemp("trimmed")
    base, updates = federation(folder, tensors, weights=weights)
    cut = int(beta * k)  # the documented rounding: down
    if 2 * cut >= k:
        with pytest.raises(NotEnoughUpdatesError, match=f"trims {cut} of {k} updates"):
            FedTrimmedAvg(beta=beta).aggregate(base, updates, folder / "out")
        assert not (folder / "out").exists()
        return
    FedTrimmedAvg(beta=beta).aggregate(base, updates, folder / "out")
    out = load_parameters(folder / "out")
    for name, stack in tensors.items():
        wide = stack.astype(np.float64)
        want = np.sort(wide, axis=0)[cut : k - cut].mean(axis=0)
        got = out[name].numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=rounding(stack))
        # the docstring's claim: SciPy's trim_mean
        np.testing.assert_allclose(scipy.stats.trim_mean(wide, beta, axis=0), want, atol=1e-9)
    assert int(out["n"]) == heaviest(weights)


# ------------------------------------------------------------------------- attacked rounds


@dataclass(frozen=True)
class Attacked:
    """A round of honest and Byzantine updates, in client-id order (row i is client c{i})."""

    stack: np.ndarray  # K x DIM, float32
    is_honest: np.ndarray  # K booleans

    @property
    def honest(self) -> np.ndarray:
        return np.asarray(self.stack[self.is_honest], dtype=np.float64)

    @property
    def lo(self) -> np.ndarray:
        return np.asarray(self.honest.min(axis=0))

    @property
    def hi(self) -> np.ndarray:
        return np.asarray(self.honest.max(axis=0))

    def diameter(self) -> float:
        """The largest L2 distance between two honest updates."""
        h = self.honest
        return float(np.sqrt(((h[:, None, :] - h[None, :, :]) ** 2).sum(axis=2)).max())

    def to_honest(self, point: np.ndarray) -> float:
        """The L2 distance from ``point`` to the nearest honest update."""
        return float(np.sqrt(((self.honest - point) ** 2).sum(axis=1)).min())

    def byzantine_beyond(self, radius: float) -> bool:
        """Whether every Byzantine update is (clearly) farther than ``radius`` from the honest."""
        return all(
            self.to_honest(row.astype(np.float64)) > radius * (1 + 1e-3) + 1e-6
            for row in self.stack[~self.is_honest]
        )

    def row(self, client_id: str) -> int:
        return int(client_id.removeprefix("c"))


def attack_points(honest: np.ndarray) -> st.SearchStrategy[np.ndarray]:
    """Where one Byzantine update may be, given the honest ones (float32, DIM coordinates)."""
    lo, hi, mean = honest.min(axis=0), honest.max(axis=0), honest.mean(axis=0)
    signs = arrays(np.float64, DIM, elements=st.sampled_from([-1.0, 1.0]))
    points = st.one_of(
        signs.map(lambda s: HUGE * s),
        st.floats(1.0, 1e3).map(lambda c: -c * mean),
        arrays(np.float64, DIM, elements=st.floats(-HUGE, HUGE, width=32)),
        st.tuples(signs, st.floats(1e-3, 2.0)).map(
            lambda t: np.where(t[0] > 0, hi + t[1] * (hi - lo + 0.01), lo - t[1] * (hi - lo + 0.01))
        ),
        st.integers(0, len(honest) - 1).map(lambda i: honest[i]),
    )
    return points.map(lambda p: np.asarray(p, dtype=np.float32))


@st.composite
def attacked(draw: st.DrawFn, k: int, f: int) -> Attacked:
    """K updates of which f are Byzantine; the honest ones near a point, the others anywhere."""
    center = draw(arrays(np.float64, DIM, elements=st.floats(-100.0, 100.0)))
    spread = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]))
    offsets = draw(arrays(np.float64, (k - f, DIM), elements=st.floats(-1.0, 1.0)))
    honest = (center + spread * offsets).astype(np.float32)
    points = attack_points(honest)
    if f and draw(st.booleans()):  # colluding: all at one point
        byzantine = np.tile(draw(points), (f, 1))
    else:
        byzantine = np.array([draw(points) for _ in range(f)], dtype=np.float32).reshape(f, DIM)
    stack = np.concatenate([honest, byzantine])
    order = np.array(draw(st.permutations(range(k))))
    return Attacked(stack[order], order < k - f)


def within(got: np.ndarray, lo: np.ndarray, hi: np.ndarray, tol: float = 0.0) -> bool:
    return bool(((lo - tol <= got) & (got <= hi + tol)).all())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 9))
def test_median_resists_fewer_than_half_byzantine(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, k: int
) -> None:
    case = data.draw(attacked(k, f=(k - 1) // 2))
    got, _ = run(FedMedian(), tmp_path_factory.mktemp("median"), case.stack)
    # exact: a median is one honest value, or the float32 mean of two (never outside them)
    assert within(got, case.lo, case.hi), (got, case.lo, case.hi)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), k=st.integers(2, 9))
def test_median_gives_way_to_half_byzantine(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, k: int
) -> None:
    f = (k - 1) // 2 + 1
    case = data.draw(attacked(k, f))
    stack = np.where(case.is_honest[:, None], case.stack, np.float32(HUGE))
    got, _ = run(FedMedian(), tmp_path_factory.mktemp("median"), stack)
    assert (got > case.hi).all()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 9), beta=st.floats(0.0, 0.5))
def test_trimmed_mean_resists_int_beta_k_byzantine(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, k: int, beta: float
) -> None:
    cut = int(beta * k)
    assume(2 * cut < k)
    case = data.draw(attacked(k, f=cut))
    got, _ = run(FedTrimmedAvg(beta=beta), tmp_path_factory.mktemp("trimmed"), case.stack)
    assert within(got, case.lo, case.hi, rounding(case.honest)), (got, case.lo, case.hi)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), k=st.integers(2, 9), beta=st.floats(0.0, 0.5))
def test_trimmed_mean_gives_way_to_one_byzantine_more(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, k: int, beta: float
) -> None:
    cut = int(beta * k)
    assume(2 * cut < k and k - cut - 1 >= 1)
    case = data.draw(attacked(k, f=cut + 1))
    stack = np.where(case.is_honest[:, None], case.stack, np.float32(HUGE))
    got, _ = run(FedTrimmedAvg(beta=beta), tmp_path_factory.mktemp("trimmed"), stack)
    assert (got > case.hi).all()


def krum_radius(case: Attacked, f: int) -> float:
    """How far from the honest updates a selected one may be (module docstring)."""
    k = len(case.stack)
    return float(np.sqrt(max(1, k - f - 2))) * case.diameter()


def assert_selection_keeps_to_the_honest(case: Attacked, f: int, selected: list[str]) -> list[int]:
    """Each selected update is honest or near one; all are honest when the attack is far."""
    radius = krum_radius(case, f)
    rows = [case.row(c) for c in selected]
    for row in rows:
        distance = case.to_honest(case.stack[row].astype(np.float64))
        assert case.is_honest[row] or distance <= radius * (1 + 1e-5) + 1e-9, (row, distance)
    if case.byzantine_beyond(radius):
        assert case.is_honest[rows].all(), rows
    return rows


@settings(max_examples=50, deadline=None)
@given(data=st.data(), f=st.integers(0, 3))
def test_krum_selects_an_honest_update_or_one_near_them(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, f: int
) -> None:
    k = 2 * f + 3  # the smallest round with K > 2f + 2
    case = data.draw(attacked(k, f))
    strategy = Krum(num_malicious=f)
    got, n = run(strategy, tmp_path_factory.mktemp("krum"), case.stack)
    assert strategy.last_selected == [f"c{n}"]
    # the result is the selected update itself
    np.testing.assert_array_equal(got, case.stack[n].astype(np.float64))
    assert_selection_keeps_to_the_honest(case, f, strategy.last_selected)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), f=st.integers(0, 3))
def test_multikrum_keeps_honest_updates_or_ones_near_them(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, f: int
) -> None:
    k = 2 * f + 3
    m = data.draw(st.integers(1, k - f), label="to_keep")
    weights = data.draw(weights_for(k), label="weights")
    case = data.draw(attacked(k, f))
    strategy = MultiKrum(num_malicious=f, to_keep=m)
    got, _ = run(strategy, tmp_path_factory.mktemp("multikrum"), case.stack, weights)
    assert len(strategy.last_selected) == len(set(strategy.last_selected)) == m
    rows = assert_selection_keeps_to_the_honest(case, f, strategy.last_selected)
    # the result is the examples-weighted mean of the selected updates
    kept = case.stack[rows].astype(np.float64)
    share = np.array([weights[r] for r in rows], dtype=np.float64)
    want = (share[:, None] * kept).sum(axis=0) / share.sum()
    np.testing.assert_allclose(got, want, rtol=0, atol=rounding(kept))
    radius = krum_radius(case, f)
    assert within(got, case.lo, case.hi, radius * (1 + 1e-5) + rounding(kept))
    if case.is_honest[rows].all():
        assert within(got, case.lo, case.hi, rounding(kept))


@pytest.mark.parametrize("f", [1, 2, 3])
def test_krum_and_multikrum_aggregate_a_round_below_their_bound(tmp_path: Path, f: int) -> None:
    """Documented: a round with K <= 2f + 2 is aggregated all the same (as Flower), not refused."""
    k = 2 * f + 2
    stack = np.random.default_rng(f).normal(size=(k, DIM)).astype(np.float32)
    got, n = run(Krum(num_malicious=f), tmp_path / "krum", stack)
    np.testing.assert_array_equal(got, stack[n].astype(np.float64))
    strategy = MultiKrum(num_malicious=f, to_keep=k + 1)  # more than the round: keeps all
    got, _ = run(strategy, tmp_path / "multikrum", stack)
    assert sorted(strategy.last_selected) == sorted(f"c{i}" for i in range(k))
    np.testing.assert_allclose(got, stack.astype(np.float64).mean(axis=0), atol=rounding(stack))


@settings(max_examples=50, deadline=None)
@given(data=st.data(), f=st.integers(0, 2))
def test_bulyan_stays_within_the_honest_range_widened_by_part_of_its_width(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, f: int
) -> None:
    k = 4 * f + 3  # the smallest round Bulyan takes
    beta = k - 4 * f
    case = data.draw(attacked(k, f))
    strategy = Bulyan(num_malicious=f)
    got, _ = run(strategy, tmp_path_factory.mktemp("bulyan"), case.stack)
    assert len(strategy.last_selected) == len(set(strategy.last_selected)) == k - 2 * f
    rows = assert_selection_keeps_to_the_honest(case, f, strategy.last_selected)
    width = case.hi - case.lo
    slack = min(f, beta) / beta * width + rounding(case.honest)
    assert within(got, case.lo - slack, case.hi + slack), (got, case.lo, case.hi)
    if case.is_honest[rows].all():  # only honest values were averaged
        assert within(got, case.lo, case.hi, rounding(case.honest)), (got, case.lo, case.hi)


def test_bulyan_may_leave_the_honest_range_by_part_of_its_width(tmp_path: Path) -> None:
    """One Byzantine update of 7, near the honest ones, is among the 3 values averaged around
    the median of coordinate 0: the result is beyond every honest value, by less than
    ``f / beta`` = 1/3 of their range (why the test above widens the range)."""
    honest = np.array([[1, 2], [2, 1], [2, 2], [1, 0], [1, 2], [2, 0]], dtype=np.float32)
    byzantine = np.array([[2.9, 2.3]], dtype=np.float32)
    stack = np.tile(np.concatenate([honest, byzantine]), (1, DIM // 2))
    strategy = Bulyan(num_malicious=1)
    got, _ = run(strategy, tmp_path, stack)
    assert "c6" in strategy.last_selected
    assert got[0] == pytest.approx(2.3, abs=1e-6)  # mean of 2, 2 and 2.9
    assert 2.0 < got[0] < 2.0 + 1 / 3


@pytest.mark.parametrize("f", [0, 1, 2])
def test_bulyan_refuses_a_round_one_short_of_its_bound(tmp_path: Path, f: int) -> None:
    k = 4 * f + 2
    stack = np.random.default_rng(f).normal(size=(k, DIM)).astype(np.float32)
    with pytest.raises(NotEnoughUpdatesError, match=f"needs at least 4 \\* {f} \\+ 3"):
        run(Bulyan(num_malicious=f), tmp_path, stack)
    assert not (tmp_path / "out").exists()
