"""Incremental aggregation: the running sum against the whole-round strategies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flctl.aggregation import (
    FedAdam,
    FedAvg,
    FedAvgM,
    RunningMean,
    RunningSum,
    SumOverflowError,
    WeightedUpdate,
    score_update,
)
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.tensors import load_parameters, save_parameters

from .conftest import federation

pytestmark = pytest.mark.usefixtures("one_thread")


def _whole(base: Path, updates: list[WeightedUpdate], out: Path) -> dict[str, torch.Tensor]:
    FedAvg().aggregate(base, updates, out)
    return load_parameters(out)


def _running(
    base: Path, added: list[WeightedUpdate], final: list[WeightedUpdate], out: Path
) -> dict[str, torch.Tensor]:
    running = RunningSum(base)
    for update in added:
        running.add(update)
    running.settle(final)
    running.write_mean(out)
    return load_parameters(out)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        if a[name].is_floating_point():
            # a sum of K float32 terms in two orders: a few ulps of the largest term
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6 * scale)
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.fixture
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("running")


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stack=st.integers(1, 7).flatmap(lambda k: hnp.arrays(np.float32, (k, 3, 4), elements=finite)),
    data=st.data(),
)
def test_incremental_and_whole_round_fedavg_agree(
    folder: Path, stack: np.ndarray, data: st.DataObject
) -> None:
    k = len(stack)
    weights = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k))
    encoding = data.draw(st.sampled_from(["full", "delta"]))
    base, updates = federation(folder, stack, weights, encoding=encoding)
    # any arrival order
    arrival = data.draw(st.permutations(updates))
    scale = float(np.abs(stack).max()) + 1.0
    _close(
        _running(base, arrival, updates, folder / "inc"),
        _whole(base, updates, folder / "whole"),
        scale,
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stack=hnp.arrays(np.float32, (6, 5), elements=finite),
    data=st.data(),
)
def test_settle_leaves_out_adds_and_reweighs_as_a_whole_round_of_the_final_set(
    folder: Path, stack: np.ndarray, data: st.DataObject
) -> None:
    base, updates = federation(folder, stack, [5, 4, 3, 2, 7, 1])
    # what the round summed as updates came in, and what it committed with: some left out
    # (over-selection, excluded outliers), some never summed, weights lowered by a share cap
    added = data.draw(st.lists(st.sampled_from(updates), unique_by=lambda u: u.client_id))
    final = data.draw(
        st.lists(st.sampled_from(updates), min_size=1, unique_by=lambda u: u.client_id)
    )
    lowered = [
        WeightedUpdate(u.path, data.draw(st.integers(1, u.num_examples)), u.client_id)
        for u in final
    ]
    scale = float(np.abs(stack).max()) + 1.0
    _close(
        _running(base, added, lowered, folder / "inc"),
        _whole(base, lowered, folder / "whole"),
        scale,
    )


def test_two_updates_give_the_same_bits_in_either_order(folder: Path) -> None:
    rng = np.random.default_rng(3)
    base, updates = federation(folder, rng.normal(size=(2, 64)).astype(np.float32), [3, 7])
    one = _running(base, updates, updates, folder / "one")
    other = _running(base, updates[::-1], updates, folder / "other")
    assert torch.equal(one["w"], other["w"])


def test_integer_tensors_come_from_the_heaviest_final_update(folder: Path) -> None:
    base, updates = federation(folder, np.ones((3, 2), dtype=np.float32), [1, 9, 4])
    # c1 is the heaviest as summed, but its weight is capped below c2's at the end
    final = [updates[0], WeightedUpdate(updates[1].path, 2, "c1"), updates[2]]
    assert int(_running(base, updates, final, folder / "out")["n"]) == 2


def test_an_update_is_summed_once(folder: Path) -> None:
    base, updates = federation(folder, np.array([[1.0], [3.0]], dtype=np.float32))
    running = RunningSum(base)
    for update in [*updates, updates[0]]:
        running.add(update)
    assert running.total == 2
    running.write_mean(folder / "out")
    assert float(load_parameters(folder / "out")["w"][0]) == 2.0


def test_refusals(folder: Path) -> None:
    base, updates = federation(folder, np.ones((1, 2), dtype=np.float32))
    running = RunningSum(base)
    with pytest.raises(NotEnoughUpdatesError):
        running.write_mean(folder / "out")
    with pytest.raises(NotEnoughUpdatesError):
        running.settle([])
    with pytest.raises(InconsistentUpdatesError, match="num_examples=0"):
        running.add(WeightedUpdate(updates[0].path, 0, "c0"))
    other = folder / "other"
    save_parameters({"w": torch.zeros(3), "n": torch.tensor(0)}, other)
    with pytest.raises(InconsistentUpdatesError):
        running.add(WeightedUpdate(other, 1, "bad"))
    assert not (folder / "out").exists()


@pytest.mark.parametrize(
    "strategy",
    [FedAvg, lambda: FedAvgM(server_learning_rate=0.5, server_momentum=0.9), FedAdam],
    ids=["fedavg", "fedavgm", "fedadam"],
)
def test_a_mean_based_strategy_gives_its_model_from_the_mean(
    folder: Path, strategy: object
) -> None:
    rng = np.random.default_rng(5)
    base, updates = federation(folder, rng.normal(size=(4, 8)).astype(np.float32), [1, 2, 3, 4])
    whole, incremental = strategy(), strategy()  # type: ignore[operator]
    assert whole.is_mean_based
    for round_ in range(2):  # the second round steps from the first's state
        whole.aggregate(base, updates, folder / f"whole{round_}")
        running = RunningSum(base)
        for update in updates[::-1]:
            running.add(update)
        running.write_mean(folder / f"mean{round_}")
        incremental.aggregate_mean(base, folder / f"mean{round_}", folder / f"inc{round_}")
        a = load_parameters(folder / f"whole{round_}")
        b = load_parameters(folder / f"inc{round_}")
        _close(a, b, 10.0)
    assert whole.state_dict().keys() == incremental.state_dict().keys()


def test_a_sum_past_the_float_range_asks_for_the_whole_round_pass(folder: Path) -> None:
    # two updates of 3e38 weigh 2 and 3: their mean is 3e38, their weighted sum is not a float32
    base, updates = federation(folder, np.full((2, 4), 3e38, dtype=np.float32), [2, 3])
    running = RunningSum(base)
    for update in updates:
        running.add(update)
    with pytest.raises(SumOverflowError, match="'w' overflowed"):
        running.write_mean(folder / "out")
    whole = _whole(base, updates, folder / "whole")["w"]
    torch.testing.assert_close(whole, torch.full((4,), 3e38))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stack=st.integers(1, 7).flatmap(lambda k: hnp.arrays(np.float32, (k, 2, 3), elements=finite)),
    keep_sum=st.booleans(),
)
def test_the_scores_taken_in_the_pass_are_score_updates_against_the_round_so_far(
    folder: Path, stack: np.ndarray, keep_sum: bool
) -> None:
    # one pass per update gives what score_update gives against a RunningMean of the updates
    # before it: the previous update's direction joins the reference in the next one's pass;
    # the sum, kept or not, changes nothing
    base, updates = federation(folder, stack, list(range(1, len(stack) + 1)))
    running = RunningSum(base, folder, keep_sum=keep_sum)
    reference = RunningMean()
    try:
        for update in updates:
            if keep_sum:
                running.add(update)
            got = running.score(update)
            assert running.score(update) is got  # scored once
            want = score_update(base, update.path, reference)
            assert got.l2 == pytest.approx(want.l2, rel=1e-6, abs=1e-30)
            if want.cosine is None:
                assert got.cosine is None
            else:
                assert got.cosine is not None
                assert got.cosine == pytest.approx(want.cosine, rel=1e-4, abs=1e-4)
    finally:
        running.close()


def test_the_fourth_update_on_has_a_cosine_and_a_flipped_one_points_away(folder: Path) -> None:
    rng = np.random.default_rng(11)
    honest = rng.normal(1.0, 0.1, size=(4, 16)).astype(np.float32)
    flipped = -5.0 * honest[:1]
    base, updates = federation(folder, np.concatenate([honest, flipped]))
    running = RunningSum(base, folder, keep_sum=False)
    scores = [running.score(u) for u in updates]
    assert [s.cosine is None for s in scores] == [True, True, True, False, False]
    assert scores[3].cosine is not None and scores[3].cosine > 0.9
    assert scores[4].cosine is not None and scores[4].cosine < -0.9
    assert scores[4].l2 > 4 * scores[0].l2
    with pytest.raises(NotEnoughUpdatesError, match="scores only"):
        running.settle(updates)
    with pytest.raises(NotEnoughUpdatesError, match="scores only"):
        running.add(updates[0])
