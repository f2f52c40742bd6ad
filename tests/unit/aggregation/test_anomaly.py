"""Byzantine detection: anomaly scores and the modified z-score outlier rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flctl.aggregation import (
    AnomalyScores,
    FedMedian,
    Outlier,
    RunningMean,
    UpdateScorer,
    WeightedUpdate,
    _anomaly,
    find_outliers,
    round_median_distances,
    score_update,
)
from flctl.aggregation._outliers import DEFAULT_THRESHOLD, robust_z_scores
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import encode_update, load_parameters, save_parameters

SHAPES = {"w": (24, 25), "b": (25,), "s": ()}


pytestmark = pytest.mark.usefixtures("one_thread")


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).ravel() for n in SHAPES])


def _random(rng: np.random.Generator, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {n: np.asarray(rng.normal(size=s), dtype=dtype) for n, s in SHAPES.items()}


# -- AnomalyScores --------------------------------------------------------------------------


def test_scores_round_trip_through_json_with_none_kept() -> None:
    for scores in (AnomalyScores(1.5), AnomalyScores(2.0, -0.25, 3.0), AnomalyScores(0.0, 1.0)):
        text = json.dumps(scores.to_dict())
        assert AnomalyScores.from_dict(json.loads(text)) == scores
    assert json.loads(json.dumps(AnomalyScores(1.0).to_dict())) == {
        "l2": 1.0,
        "cosine": None,
        "median_distance": None,
    }
    assert AnomalyScores.from_dict({"l2": 2}) == AnomalyScores(2.0)
    assert AnomalyScores(1.0, 0.5).with_median_distance(4) == AnomalyScores(1.0, 0.5, 4.0)


@pytest.mark.parametrize(
    "data",
    [{}, {"l2": None}, {"l2": "1"}, {"l2": True}, {"l2": math.inf}, {"l2": 1, "cosine": math.nan}],
)
def test_scores_from_bad_data_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="l2|finite"):
        AnomalyScores.from_dict(data)


# -- UpdateScorer ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_scorer_equals_numpy(monkeypatch: pytest.MonkeyPatch, dtype: type, chunk: int) -> None:
    monkeypatch.setattr(_anomaly, "_CHUNK", chunk)  # slices cross tensor boundaries or not
    rng = np.random.default_rng(3)
    delta, mean = _random(rng, dtype), _random(rng, dtype)
    scorer = UpdateScorer()
    for name in SHAPES:
        scorer.add(torch.from_numpy(delta[name]), torch.from_numpy(mean[name]))
    got = scorer.result(median_distance=2.5)
    d, m = _flat(delta), _flat(mean)
    assert got.l2 == pytest.approx(np.linalg.norm(d), rel=1e-12)
    want = float(d @ m / (np.linalg.norm(d) * np.linalg.norm(m)))
    assert got.cosine == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got.median_distance == 2.5


def test_scorer_without_a_running_mean_has_no_cosine() -> None:
    scorer = UpdateScorer()
    scorer.add(torch.tensor([3.0, 4.0]), None)
    assert scorer.result() == AnomalyScores(5.0, None, None)


def test_scorer_cosine_is_none_for_a_zero_norm() -> None:
    zero_delta = UpdateScorer()
    zero_delta.add(torch.zeros(3), torch.ones(3))
    assert zero_delta.result() == AnomalyScores(0.0, None)
    zero_mean = UpdateScorer()
    zero_mean.add(torch.ones(4), torch.zeros(4))
    assert zero_mean.result() == AnomalyScores(2.0, None)
    opposite = UpdateScorer()
    opposite.add(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0]))
    assert opposite.result().cosine == -1.0


def test_scorer_refuses_what_it_cannot_score() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        UpdateScorer().add(torch.tensor([1, 2]), None)
    with pytest.raises(ValueError, match="shape"):
        UpdateScorer().add(torch.zeros(2), torch.zeros(3))
    mixed = UpdateScorer()
    mixed.add(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="or none does"):
        mixed.add(torch.ones(2), None)
    with pytest.raises(ValueError, match="median_distance"):
        UpdateScorer().result(median_distance=-1.0)


def test_running_mean_is_the_weighted_mean() -> None:
    running = RunningMean(min_updates=1)
    assert running.mean("w") is None
    values = [(torch.tensor([1.0, 2.0]), 1.0), (torch.tensor([4.0, -1.0]), 2.0)]
    for delta, weight in values:
        running.add("w", delta, weight)
    torch.testing.assert_close(running.mean("w"), torch.tensor([3.0, 0.0]), atol=1e-6, rtol=0)
    assert values[0][0].tolist() == [1.0, 2.0]  # the first delta is copied, not kept
    assert running.count("w") == 2 and running.count("b") == 0
    with pytest.raises(ValueError, match="shape"):
        running.add("w", torch.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        running.add("w", torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="min_updates"):
        RunningMean(min_updates=0)


def test_running_mean_gives_a_mean_from_its_third_update() -> None:
    running = RunningMean()
    for i in range(3):
        assert running.mean("w") is None
        running.add("w", torch.full((2,), float(i)))
    torch.testing.assert_close(running.mean("w"), torch.ones(2))


# -- score_update on files -------------------------------------------------------------------


def _files(
    folder: Path,
    models: list[dict[str, np.ndarray]],
    encoding: str = "full",
    dtype: str = "float32",
) -> Path:
    """Base 0.5 plus a counter; update i holds models[i] (and the counter i)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {n: torch.full(s, 0.5) for n, s in SHAPES.items()} | {"n": torch.tensor(0)}
    save_parameters(base, folder / "base")
    for i, values in enumerate(models):
        params = {n: torch.from_numpy(np.asarray(v)) for n, v in values.items()}
        params["n"] = torch.tensor(i)
        encode_update(folder / "base", params, folder / f"u{i}", encoding=encoding, dtype=dtype)
    return folder / "base"


@pytest.mark.parametrize("encoding", ["full", "delta"])
def test_score_update_scores_against_the_mean_direction(tmp_path: Path, encoding: str) -> None:
    rng = np.random.default_rng(5)
    models = [_random(rng) for _ in range(3)]
    models[1] = {n: (v - 0.5) * 10 + 0.5 for n, v in models[1].items()}  # a long one
    base = _files(tmp_path, models, encoding=encoding, dtype="float32")
    running = RunningMean(min_updates=1)
    got = [score_update(base, tmp_path / f"u{i}", running) for i in range(3)]
    deltas = [_flat(m) - 0.5 for m in models]
    directions = [d / np.linalg.norm(d) for d in deltas]
    assert got[0].cosine is None and got[0].median_distance is None
    for i, delta in enumerate(deltas):
        assert got[i].l2 == pytest.approx(np.linalg.norm(delta), rel=1e-6)
        if i:
            mean = np.mean(directions[:i], axis=0)  # each update one vote, whatever its norm
            want = delta @ mean / (np.linalg.norm(delta) * np.linalg.norm(mean))
            assert got[i].cosine == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(
        np.concatenate([running.mean(n).numpy().ravel() for n in SHAPES]),  # type: ignore[union-attr]
        np.mean(directions, axis=0),
        rtol=1e-5,
        atol=1e-7,
    )
    assert running.mean("n") is None  # counters are not scored


def test_score_update_without_a_running_mean_and_of_a_zero_update(tmp_path: Path) -> None:
    zero = {n: np.full(s, 0.5, dtype=np.float32) for n, s in SHAPES.items()}
    base = _files(tmp_path, [zero, _random(np.random.default_rng(1))])
    assert score_update(base, tmp_path / "u0") == AnomalyScores(0.0)
    running = RunningMean(min_updates=1)
    assert score_update(base, tmp_path / "u0", running) == AnomalyScores(0.0)
    assert running.count("w") == 0  # no direction: it adds nothing
    assert score_update(base, tmp_path / "u1", running).cosine is None


def test_score_update_refuses_an_update_of_another_model(tmp_path: Path) -> None:
    base = _files(tmp_path, [_random(np.random.default_rng(0))])
    save_parameters({"w": torch.zeros(2)}, tmp_path / "other")
    with pytest.raises(InconsistentUpdatesError):
        score_update(base, tmp_path / "other")


# -- median distances ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 6])
@pytest.mark.parametrize("chunk", [4, 1 << 20])
def test_median_distances_equal_numpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, chunk: int
) -> None:
    monkeypatch.setattr(_anomaly, "_CHUNK", chunk)  # the median is sorted in slices
    rng = np.random.default_rng(k)
    models = [_random(rng) for _ in range(k)]
    base = _files(tmp_path, models, encoding="delta", dtype="float32")
    # arrival order does not matter: the result is by client id
    updates = [WeightedUpdate(tmp_path / f"u{i}", 1, f"c{i}") for i in reversed(range(k))]
    got = round_median_distances(base, updates)
    stacked = np.stack([_flat(m) for m in models])
    median = np.median(stacked, axis=0)  # the mean of the two middle values for an even K
    want = {f"c{i}": float(np.linalg.norm(stacked[i] - median)) for i in range(k)}
    assert list(got) == sorted(want)
    for client, distance in want.items():
        assert got[client] == pytest.approx(distance, rel=1e-5, abs=1e-6)


def test_median_distances_are_to_the_model_fedmedian_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    models = [_random(rng) for _ in range(4)]
    base = _files(tmp_path, models)
    updates = [WeightedUpdate(tmp_path / f"u{i}", 1, f"c{i}") for i in range(4)]
    FedMedian().aggregate(base, updates, tmp_path / "median")
    median = load_parameters(tmp_path / "median")
    got = round_median_distances(base, updates)
    for i, model in enumerate(models):
        want = math.sqrt(sum(float(((model[n] - median[n].numpy()) ** 2).sum()) for n in SHAPES))
        assert got[f"c{i}"] == pytest.approx(want, rel=1e-6)


def test_median_distances_refuse_an_empty_round_and_a_client_twice(tmp_path: Path) -> None:
    base = _files(tmp_path, [_random(np.random.default_rng(0))])
    with pytest.raises(NotEnoughUpdatesError):
        round_median_distances(base, [])
    twice = [WeightedUpdate(tmp_path / "u0", 1, "c1")] * 2
    with pytest.raises(InconsistentUpdatesError, match="two updates of one client"):
        round_median_distances(base, twice)


# -- the outlier rule -------------------------------------------------------------------------


def _round(
    tmp_path: Path, attackers: dict[int, str], honest: int = 8, seed: int = 0
) -> dict[str, AnomalyScores]:
    """A round's scores as the coordinator takes them: in arrival order, then the median."""
    rng = np.random.default_rng(seed)
    direction = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    deltas: list[dict[str, np.ndarray]] = []
    for i in range(honest + len(attackers)):
        kind = attackers.get(i, "honest")
        if kind == "flip":  # sign-flipped and scaled x5
            d = {n: -5 * v for n, v in direction.items()}
        elif kind == "noise":  # Gaussian noise of about the update's size, no direction
            d = {n: 3 * rng.normal(size=v.shape).astype(np.float32) for n, v in direction.items()}
        else:  # the common direction, each client's data adding its own part
            d = {
                n: v * rng.uniform(0.8, 1.2) + 0.3 * rng.normal(size=v.shape).astype(np.float32)
                for n, v in direction.items()
            }
        deltas.append({n: np.asarray(v + 0.5, dtype=np.float32) for n, v in d.items()})
    base = _files(tmp_path, deltas, encoding="delta", dtype="float32")
    running = RunningMean()
    scores = {
        f"c{i:02d}": score_update(base, tmp_path / f"u{i}", running) for i in range(len(deltas))
    }
    updates = [WeightedUpdate(tmp_path / f"u{i}", 1, f"c{i:02d}") for i in range(len(deltas))]
    distances = round_median_distances(base, updates)
    return {c: s.with_median_distance(distances[c]) for c, s in scores.items()}


@pytest.mark.parametrize("seed", range(5))
def test_a_clean_round_has_no_outliers(tmp_path: Path, seed: int) -> None:
    assert find_outliers(_round(tmp_path, {}, honest=10, seed=seed), threshold=3.5) == {}


@pytest.mark.parametrize("seed", range(5))
def test_the_rule_finds_a_sign_flipped_and_a_noise_update(tmp_path: Path, seed: int) -> None:
    scores = _round(tmp_path, {3: "flip", 6: "noise"}, seed=seed)
    found = find_outliers(scores)
    assert sorted(found) == ["c03", "c06"], found
    for outlier in found.values():
        assert outlier.threshold == 3.5
        assert outlier.z > 3.5 if outlier.score != "cosine" else outlier.z < -3.5
        assert outlier.value == getattr(
            scores["c03" if outlier is found["c03"] else "c06"], outlier.score
        )


def test_the_rule_finds_each_attack_alone(tmp_path: Path) -> None:
    flip = find_outliers(_round(tmp_path / "flip", {4: "flip"}))
    assert list(flip) == ["c04"] and flip["c04"].score in ("l2", "median_distance")
    noise = find_outliers(_round(tmp_path / "noise", {2: "noise"}))
    assert list(noise) == ["c02"]


def _l2(*values: float) -> dict[str, AnomalyScores]:
    return {f"c{i}": AnomalyScores(v) for i, v in enumerate(values)}


def test_fewer_than_three_updates_have_no_outliers() -> None:
    assert find_outliers(_l2(1.0, 1000.0)) == {}
    assert find_outliers(_l2(1.0)) == {}
    assert find_outliers({}) == {}


def test_a_mad_of_zero_falls_back_to_the_mean_absolute_deviation() -> None:
    # MAD 0; mean absolute deviation 99 / 5: z = 99 / (1.2533 * 19.8) = 3.99
    found = find_outliers(_l2(1, 1, 1, 1, 100))
    assert list(found) == ["c4"]
    assert found["c4"].z == pytest.approx(99 / (1.2533 * 19.8))
    # with four updates the same outlier reaches only 3.19
    assert find_outliers(_l2(1, 1, 1, 100)) == {}
    assert robust_z_scores([1, 1, 1, 100]) == pytest.approx([0, 0, 0, 99 / (1.2533 * 24.75)])
    # no spread at all: nothing stands out (rounding-sized spreads neither)
    assert robust_z_scores([2.0, 2.0, 2.0]) is None
    assert find_outliers(_l2(5, 5, 5, 5, 5 + 1e-12)) == {}


def test_the_modified_z_score() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, MAD 1
    assert robust_z_scores(values) == pytest.approx([0.6745 * (v - 3) for v in values])
    assert list(find_outliers(_l2(*values))) == ["c4"]
    assert find_outliers(_l2(*values), threshold=70) == {}


def test_only_the_suspicious_side_of_each_score_counts() -> None:
    small_l2 = _l2(1.0, 1.01, 0.99, 1.02, 0.98, 1e-6)
    assert find_outliers(small_l2) == {}
    cosines = [0.9, 0.91, 0.89, 0.9, 0.92, -0.8, None]
    scores = {f"c{i}": AnomalyScores(1.0, c) for i, c in enumerate(cosines)}
    found = find_outliers(scores)
    assert list(found) == ["c5"] and found["c5"].score == "cosine" and found["c5"].z < -3.5
    high = {f"c{i}": AnomalyScores(1.0, c) for i, c in enumerate([0.1, 0.11, 0.09, 0.1, 0.99])}
    assert find_outliers(high) == {}


def test_a_score_fewer_than_three_updates_have_is_not_judged() -> None:
    scores = _l2(1.0, 1.0, 1.0, 1.0) | {
        "c0": AnomalyScores(1.0, 0.9),
        "c1": AnomalyScores(1.0, -0.9),
    }
    assert find_outliers(scores) == {}


def test_never_more_than_a_minority_is_an_outlier() -> None:
    # each of three updates trips another score; K = 5 keeps the two of largest |z|
    scores = {
        "a": AnomalyScores(1.00, 0.90, 1.0),
        "b": AnomalyScores(1.01, 0.91, 1.1),
        "c": AnomalyScores(0.99, 0.89, 50.0),  # median distance: z 48.9 / 0.22 (the floor) ~ 222
        "d": AnomalyScores(1.00, -1.00, 1.2),  # cosine: z -1.9 / 0.1 (the floor) = -19
        "e": AnomalyScores(9.00, 0.90, 1.0),  # l2: z 8 / 0.2 (the floor, 0.2 x 1) = 40
    }
    found = find_outliers(scores)
    assert sorted(found) == ["c", "e"]
    assert (found["c"].score, found["e"].score) == ("median_distance", "l2")
    # the worst score of an update is the one reported
    both = find_outliers(_l2(1.0, 1.01, 0.99) | {"c3": AnomalyScores(1.0, None, 1e6)})
    assert both == {}  # median_distance has a single value: not judged, l2 is clean


def test_ties_keep_client_id_order() -> None:
    # median 25.5, MAD 24.5: both large updates have z 0.6745; K = 4 keeps at most one
    found = find_outliers(
        {"d": AnomalyScores(50.0), "c": AnomalyScores(50.0)}
        | {"a": AnomalyScores(1.0), "b": AnomalyScores(1.0)},
        threshold=0.5,
    )
    assert list(found) == ["c"] and found["c"].z == pytest.approx(0.6745)


def test_a_spread_floor_keeps_alike_updates_in() -> None:
    # five very alike updates: the one 5 % longer is far out in MADs, but near the median
    alike = _l2(1.0, 1.001, 0.999, 1.0005, 1.05)
    assert robust_z_scores([s.l2 for s in alike.values()])[-1] > 30  # type: ignore[index]
    assert find_outliers(alike) == {}
    assert list(find_outliers(alike, relative_floor=0)) == ["c4"]
    # a cosine 0.35 below the median is the least that trips (floor 0.1, threshold 3.5)
    cosines = [0.9, 0.91, 0.89, 0.9, 0.5, 0.56]
    scores = {f"c{i}": AnomalyScores(1.0, c) for i, c in enumerate(cosines)}
    assert list(find_outliers(scores)) == ["c4"]
    assert DEFAULT_THRESHOLD == 3.5


@pytest.mark.parametrize("threshold", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_threshold_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        find_outliers(_l2(1, 2, 3), threshold=threshold)
    with pytest.raises(ValueError, match="floors"):
        find_outliers(_l2(1, 2, 3), cosine_floor=-0.1)


def test_an_outlier_says_why() -> None:
    high = Outlier("l2", 12.5, 8.123, 3.5)
    assert high.reason == "l2 12.5 (z 8.12 > 3.5)"
    assert high.to_dict() == {"score": "l2", "value": 12.5, "z": 8.123, "threshold": 3.5}
    assert Outlier("cosine", -0.97, -6.0, 3.5).reason == "cosine -0.97 (z -6.00 < -3.5)"
