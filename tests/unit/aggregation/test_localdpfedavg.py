"""Local DP's aggregation (the unweighted mean of noised deltas) and adaptive DP-FedAvg."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flctl.aggregation import DpFedAvg, LocalDpFedAvg, WeightedUpdate
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.privacy import AdaptiveClipping, privatize_update
from flctl.tensors import load_parameters, save_parameters


def _base(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    base = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10,
        "count": torch.tensor(5, dtype=torch.int64),
    }
    save_parameters(base, tmp_path / "base")
    return base, tmp_path / "base"


def test_the_mean_of_noised_deltas_has_equal_weights_and_the_base_counters(
    tmp_path: Path,
) -> None:
    base, base_path = _base(tmp_path)
    shifts = [0.1, 0.2, 0.6]
    updates = []
    for i, shift in enumerate(shifts):
        trained = {"w": base["w"] + shift, "count": torch.tensor(50 + i)}
        path = tmp_path / f"u{i}"
        # noise multiplier 0: no noise, a large clip: no clipping, so the mean is exact
        privatize_update(base_path, trained, path, clip_norm=1e6, noise_multiplier=0.0)
        updates.append(WeightedUpdate(path, num_examples=10 ** (i + 1), client_id=f"c{i}"))
    LocalDpFedAvg().aggregate(base_path, updates, tmp_path / "out")
    got = load_parameters(tmp_path / "out")
    # num_examples (10, 100, 1000) would give 0.5626; equal weights give the plain mean 0.3
    torch.testing.assert_close(got["w"], base["w"] + 0.3, rtol=0, atol=1e-6)
    assert got["count"].item() == 5


def test_the_noise_of_n_clients_averages_down_by_sqrt_n(tmp_path: Path) -> None:
    base = {"w": torch.zeros(200, 200)}
    save_parameters(base, tmp_path / "base")
    n, z, clip = 9, 1.0, 3.0
    seeded = torch.Generator().manual_seed(11)  # a fixed seed, in this test only
    updates = []
    for i in range(n):
        path = tmp_path / f"u{i}"
        privatize_update(
            tmp_path / "base",
            {"w": torch.zeros(200, 200)},
            path,
            clip_norm=clip,
            noise_multiplier=z,
            generator=seeded,
        )
        updates.append(WeightedUpdate(path, 1, f"c{i}"))
    LocalDpFedAvg().aggregate(tmp_path / "base", updates, tmp_path / "out")
    got = load_parameters(tmp_path / "out")["w"]
    assert float(got.std()) == pytest.approx(z * clip / math.sqrt(n), rel=0.02)


def test_a_full_update_is_refused_with_the_client_named(tmp_path: Path) -> None:
    base, base_path = _base(tmp_path)
    save_parameters({"w": base["w"] + 1, "count": torch.tensor(1)}, tmp_path / "full")
    with pytest.raises(InconsistentUpdatesError, match="'c7'.*full model"):
        LocalDpFedAvg().aggregate(
            base_path, [WeightedUpdate(tmp_path / "full", 1, "c7")], tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotEnoughUpdatesError):
        LocalDpFedAvg().aggregate(base_path, [], tmp_path / "out")


def test_adaptive_dpfedavg_releases_the_unclipped_fraction(tmp_path: Path) -> None:
    base, base_path = _base(tmp_path)
    norms = [0.5, 0.9, 2.0, 4.0]  # two under the clip norm 1.0, two over
    updates = []
    for i, norm in enumerate(norms):
        delta = torch.zeros(3, 4)
        delta[0, 0] = norm
        save_parameters({"w": base["w"] + delta, "count": base["count"]}, tmp_path / f"u{i}")
        updates.append(WeightedUpdate(tmp_path / f"u{i}", 1, f"c{i}"))
    adaptive = AdaptiveClipping(0.5, 0.2, count_stddev=1e-9)
    strategy = DpFedAvg(1.0, 0.0, denominator=4.0, adaptive=adaptive)
    strategy.aggregate(base_path, updates, tmp_path / "out")
    assert strategy.last_norms == pytest.approx(norms, rel=1e-6)
    assert strategy.last_unclipped_fraction == pytest.approx(0.5, abs=1e-6)
    # without adaptive clipping nothing is released about the count
    plain = DpFedAvg(1.0, 0.0, denominator=4.0)
    plain.aggregate(base_path, updates, tmp_path / "out2")
    assert plain.last_unclipped_fraction is None
