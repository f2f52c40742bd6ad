"""Local DP: the client's clipped, noised delta, and what one local round is charged."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import dp_accounting
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InvalidInputError, PrivacyError
from flctl.privacy import (
    Accountant,
    LocalRelease,
    SampledGaussianRound,
    local_round,
    privatize_update,
)
from flctl.store import LedgerRecord
from flctl.tensors import (
    TensorReader,
    UpdateEncoding,
    UpdateReader,
    load_parameters,
    read_metadata,
    save_parameters,
    sha256_file,
)

DELTA = 1e-5


@st.composite
def models(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base model and a trained version of it, magnitudes from tiny to huge."""
    shapes = draw(
        st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=4)
    )
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e6]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    base = {
        f"t{i}": torch.randn(tuple(s), generator=gen, dtype=dtype) for i, s in enumerate(shapes)
    }
    trained = {
        k: v + scale * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in base.items()
    }
    base["steps"] = torch.tensor(3, dtype=torch.int64)
    trained["steps"] = torch.tensor(7, dtype=torch.int64)  # a client's counter: never sent
    return base, trained


def _written_delta(path: Path, base: Path) -> dict[str, torch.Tensor]:
    with TensorReader(base) as model, UpdateReader(path, model) as update:
        return {
            name: update.read_delta(name, dtype=torch.float64)
            for name, spec in model.specs.items()
            if spec.dtype in ("F32", "F64")
        }


@settings(max_examples=60, deadline=None)
@given(pair=models(), clip=st.floats(1e-3, 1e3))
def test_the_uploaded_delta_is_clipped_to_the_clip_norm(
    pair: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], clip: float
) -> None:
    base, trained = pair
    with tempfile.TemporaryDirectory() as tmp:
        base_path, out = Path(tmp) / "base.safetensors", Path(tmp) / "update.safetensors"
        save_parameters(base, base_path)
        release = privatize_update(base_path, trained, out, clip_norm=clip, noise_multiplier=0.0)
        delta = _written_delta(out, base_path)
        steps = load_parameters(out)["steps"]
    norm = math.sqrt(sum(float((d * d).sum()) for d in delta.values()))
    # float32 models travel in float32: the stored delta is rounded to 2^-24 relative
    tolerance = (
        1e-12
        if all(t.dtype == torch.float64 for t in base.values() if t.is_floating_point())
        else 1e-6
    )
    assert norm <= clip * (1 + tolerance)
    want = math.sqrt(
        sum(float(((trained[k].double() - base[k].double()) ** 2).sum()) for k in delta)
    )
    assert release.norm == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert release.factor == pytest.approx(min(1.0, clip / want) if want else 1.0, rel=1e-12)
    if release.factor < 1:
        assert norm == pytest.approx(clip, rel=1e-5)
    assert int(steps) == 3  # the base's counter, never the client's


def test_noise_has_std_z_times_c_per_coordinate(tmp_path: Path) -> None:
    z, clip = 0.5, 2.0
    base = {"w": torch.zeros(400, 500), "b": torch.zeros(1000)}
    save_parameters(base, tmp_path / "base.safetensors")
    trained = {k: v.clone() for k, v in base.items()}  # a zero delta: the upload is pure noise
    seeded = torch.Generator().manual_seed(20240611)  # a fixed seed, in this test only
    release = privatize_update(
        tmp_path / "base.safetensors",
        trained,
        tmp_path / "u.safetensors",
        clip_norm=clip,
        noise_multiplier=z,
        generator=seeded,
    )
    assert release == LocalRelease(norm=0.0, factor=1.0, noise_std=z * clip)
    noise = torch.cat(
        [
            d.reshape(-1)
            for d in _written_delta(
                tmp_path / "u.safetensors", tmp_path / "base.safetensors"
            ).values()
        ]
    )
    n = noise.numel()
    assert n == 201_000
    # sample std: standard error sigma / sqrt(2n) = 0.16 % of sigma; 1 % is over 6 errors
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.01)
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(n)
    # the two tensors are not the same draw
    w, b = noise[:200_000], noise[200_000:]
    assert not torch.equal(w[:1000], b)


def test_without_a_generator_the_noise_is_fresh_each_time(tmp_path: Path) -> None:
    base = {"w": torch.zeros(64)}
    save_parameters(base, tmp_path / "base.safetensors")
    outs = []
    for i in range(2):
        privatize_update(
            tmp_path / "base.safetensors",
            {"w": torch.zeros(64)},
            tmp_path / f"u{i}.safetensors",
            clip_norm=1.0,
            noise_multiplier=1.0,
        )
        outs.append(load_parameters(tmp_path / f"u{i}.safetensors")["w"])
    assert not torch.equal(outs[0], outs[1])
    assert all(float(o.abs().sum()) > 0 for o in outs)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_update_is_a_delta_of_this_base_in_the_travel_dtype(tmp_path: Path, dtype: str) -> None:
    base = {"w": torch.ones(8, 8), "n": torch.tensor([1, 2], dtype=torch.int32)}
    save_parameters(base, tmp_path / "base.safetensors")
    digest = sha256_file(tmp_path / "base.safetensors")
    trained = {"w": torch.ones(8, 8) * 1.5, "n": torch.tensor([9, 9], dtype=torch.int32)}
    privatize_update(
        tmp_path / "base.safetensors",
        trained,
        tmp_path / "u.safetensors",
        clip_norm=100.0,
        noise_multiplier=1e-6,
        dtype=dtype,
        generator=torch.Generator().manual_seed(1),
    )
    metadata = read_metadata(tmp_path / "u.safetensors")
    assert UpdateEncoding.from_metadata(metadata) == UpdateEncoding("delta", dtype, digest)
    delta = _written_delta(tmp_path / "u.safetensors", tmp_path / "base.safetensors")
    assert torch.allclose(delta["w"], torch.full((8, 8), 0.5, dtype=torch.float64), atol=1e-2)
    assert load_parameters(tmp_path / "u.safetensors")["n"].tolist() == [1, 2]


def test_bad_input_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    save_parameters({"w": torch.zeros(3)}, tmp_path / "base.safetensors")
    out = tmp_path / "u.safetensors"
    base = tmp_path / "base.safetensors"
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        privatize_update(
            base,
            {"w": torch.tensor([1.0, math.nan, 0.0])},
            out,
            clip_norm=1.0,
            noise_multiplier=1.0,
        )
    with pytest.raises(InvalidInputError, match="do not match"):
        privatize_update(base, {"w": torch.zeros(4)}, out, clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="clip_norm"):
        privatize_update(base, {"w": torch.ones(3)}, out, clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        privatize_update(base, {"w": torch.ones(3)}, out, clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(InvalidInputError, match="overflows float16"):
        privatize_update(
            base, {"w": torch.ones(3)}, out, clip_norm=1.0, noise_multiplier=1e6, dtype="float16"
        )
    assert not out.exists()


@pytest.mark.parametrize("z", [0.5, 1.0, 4.0])
def test_a_local_round_is_a_gaussian_of_sensitivity_two_c_without_sampling(z: float) -> None:
    rounds = 7
    acc = Accountant(DELTA, [local_round(z)] * rounds)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), rounds)
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event)
    assert acc.epsilon("rdp") == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    assert acc.epsilon("pld") == pytest.approx(pld.get_epsilon(DELTA), rel=1e-6)
    assert acc.epsilon("pld") <= acc.epsilon("rdp")
    with pytest.raises(PrivacyError):
        local_round(0.0)


def test_a_local_ledger_row_is_rebuilt_as_the_local_round() -> None:
    row = LedgerRecord(
        id=1,
        round_id=1,
        mechanism="local",
        noise_multiplier=1.3,
        sampling="poisson",
        sampling_rate=1.0,
        population=None,
        sample_size=None,
        clip_norm=1.0,
        epsilon_rdp=1.0,
        epsilon_pld=1.0,
        delta=DELTA,
        created=0.0,
    )
    assert SampledGaussianRound(**row.mechanism_args()) == local_round(1.3)
