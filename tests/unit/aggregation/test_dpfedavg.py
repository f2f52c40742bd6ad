import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.aggregation import DpFedAvg, WeightedUpdate
from flctl.core.errors import InconsistentUpdatesError, NotEnoughUpdatesError, PrivacyError
from flctl.tensors import encode_update, load_parameters, save_parameters


def write(path: Path, params: dict[str, torch.Tensor]) -> Path:
    save_parameters(params, path)
    return path


def _norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(
            float(((a[n].double() - b[n].double()) ** 2).sum())
            for n in a
            if a[n].is_floating_point()
        )
    )


def test_without_noise_equals_the_clipped_mean_over_the_denominator(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
        "count": torch.tensor(7, dtype=torch.int64),
    }
    scales = [0.1, 5.0, 20.0]  # the first is under the clip norm, the others are clipped
    models = []
    for s in scales:
        m = {
            n: (t + s * torch.randn(t.shape, generator=gen, dtype=t.dtype))
            for n, t in base.items()
            if t.is_floating_point()
        }
        m["count"] = torch.tensor(99, dtype=torch.int64)
        models.append(m)
    clip, denominator = 1.5, 4.0
    want = {n: torch.zeros_like(t) for n, t in base.items() if t.is_floating_point()}
    for m in models:
        factor = min(1.0, clip / _norm(m, base))
        for n in want:
            want[n] += (m[n] - base[n]) * factor
    updates = [
        WeightedUpdate(write(tmp_path / f"u{i}", m), 10 ** (i + 1), f"c{i}")
        for i, m in enumerate(models)
    ]
    strategy = DpFedAvg(clip, 0.0, denominator)
    strategy.aggregate(write(tmp_path / "base", base), updates, tmp_path / "out")
    got = load_parameters(tmp_path / "out")
    for n in want:
        torch.testing.assert_close(got[n], base[n] + want[n] / denominator, rtol=1e-12, atol=1e-12)
    assert got["count"].item() == 7  # integer tensors come from the base, never from a client
    assert strategy.last_clip_factors[0] == 1.0
    assert all(f < 1.0 for f in strategy.last_clip_factors[1:])


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=3),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 10.0),
    seed=st.integers(0, 10_000),
)
def test_clipping_bounds_each_contribution(
    tmp_path_factory: pytest.TempPathFactory,
    shapes: list[list[int]],
    scale: float,
    clip: float,
    seed: int,
) -> None:
    folder = tmp_path_factory.mktemp("dp")
    gen = torch.Generator().manual_seed(seed)
    base = {
        f"t{i}": torch.randn(tuple(s), generator=gen, dtype=torch.float64)
        for i, s in enumerate(shapes)
    }
    update = {
        n: t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in base.items()
    }
    DpFedAvg(clip, 0.0, 1.0).aggregate(
        write(folder / "base", base),
        [WeightedUpdate(write(folder / "u", update), 1)],
        folder / "out",
    )
    got = load_parameters(folder / "out")
    contribution = _norm(got, base)
    assert contribution <= clip * (1 + 1e-9)
    assert contribution == pytest.approx(min(clip, _norm(update, base)), rel=1e-9, abs=1e-12)


def test_noise_std_matches_the_formula(tmp_path: Path) -> None:
    n = 1_000_000
    base = {"w": torch.zeros(n, dtype=torch.float64)}
    update = write(tmp_path / "u", base)  # a zero delta: the output is noise alone
    z, clip, denominator = 1.3, 2.0, 8.0
    strategy = DpFedAvg(clip, z, denominator, generator=torch.Generator().manual_seed(1234))
    strategy.aggregate(
        write(tmp_path / "base", base), [WeightedUpdate(update, 1)], tmp_path / "out"
    )
    noise = load_parameters(tmp_path / "out")["w"]
    want = z * clip / denominator
    # With n i.i.d. normal draws the sample std has a relative standard error of about
    # 1/sqrt(2n) = 7e-4 and the mean a standard error of want/sqrt(n): 1 % and 5 standard
    # errors are more than 10 standard errors wide, yet would catch a wrong denominator or
    # a noise added per update instead of once.
    assert float(noise.std()) == pytest.approx(want, rel=0.01)
    assert abs(float(noise.mean())) < 5 * want / math.sqrt(n)


def test_errors(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    with pytest.raises(NotEnoughUpdatesError):
        DpFedAvg(1.0, 1.0, 1.0).aggregate(base, [], tmp_path / "out")
    other = write(tmp_path / "other", {"w": torch.zeros(4)})
    with pytest.raises(InconsistentUpdatesError):
        DpFedAvg(1.0, 1.0, 1.0).aggregate(base, [WeightedUpdate(other, 1)], tmp_path / "out")
    with pytest.raises(PrivacyError):
        DpFedAvg(1.0, 1.0, 0.0)


def test_a_delta_encoded_update_is_clipped_as_its_full_twin(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    base = {
        "w": torch.randn(6, 5, generator=gen, dtype=torch.float64),
        "count": torch.tensor(4, dtype=torch.int64),
    }
    trained = {"w": base["w"] + 3.0 * torch.randn(6, 5, generator=gen, dtype=torch.float64)}
    trained["count"] = torch.tensor(50, dtype=torch.int64)
    base_path = write(tmp_path / "base", base)
    full = write(tmp_path / "full", trained)
    # "float32" keeps the model's float64: the delta is exact up to one float64 rounding
    encode_update(base_path, trained, tmp_path / "d64", encoding="delta", dtype="float32")
    encode_update(base_path, trained, tmp_path / "dbf", encoding="delta", dtype="bfloat16")
    outs = {}
    factors = {}
    for name, path in (("full", full), ("d64", tmp_path / "d64"), ("dbf", tmp_path / "dbf")):
        strategy = DpFedAvg(1.0, 0.0, 1.0)
        strategy.aggregate(base_path, [WeightedUpdate(path, 1, name)], tmp_path / f"out-{name}")
        outs[name] = load_parameters(tmp_path / f"out-{name}")
        factors[name] = strategy.last_clip_factors[0]
    assert factors["d64"] == pytest.approx(factors["full"], rel=1e-12)
    torch.testing.assert_close(outs["d64"]["w"], outs["full"]["w"], rtol=1e-12, atol=1e-12)
    # a bfloat16 delta is clipped as it arrived: its contribution is still at most C
    assert _norm(outs["dbf"], base) <= 1.0 * (1 + 1e-9)
    assert factors["dbf"] == pytest.approx(factors["full"], rel=2.0**-7)
    assert all(out["count"].item() == 4 for out in outs.values())


def test_a_delta_from_another_model_is_refused(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    stale = write(tmp_path / "stale", {"w": torch.ones(3)})
    encode_update(stale, {"w": torch.ones(3)}, tmp_path / "u", encoding="delta", dtype="float16")
    with pytest.raises(InconsistentUpdatesError, match="'c1'.*not from this round's model"):
        DpFedAvg(1.0, 0.0, 1.0).aggregate(
            base, [WeightedUpdate(tmp_path / "u", 1, "c1")], tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()
