"""Update encodings round-trip within their stated error bounds.

For a trained value ``p``, its base value ``b``, the value that travels ``r`` (``p`` for full,
``p - b`` for delta) and the value the coordinator rebuilds ``p'``, with ``u_T`` the unit
roundoff of the travel dtype (float16 2^-11, bfloat16 2^-8, float32 2^-24, float64 2^-53),
``tiny_T`` its smallest step near zero (float16 2^-24) and ``u_C`` that of the dtype the
difference and sum are computed in (float32, or float64 for float64 models):

- full, in the model's own dtype: exact;
- otherwise: ``|p' - p| <= u_T * |r| + tiny_T + 2 * u_C * (|p| + |b|)``, with a 1e-3 relative
  slack on the first term for the double rounding of a float64 value to half precision.

Integer tensors are exact in every encoding. docs/benchmarks.md states the same bounds for
float32 models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InconsistentUpdatesError, InvalidInputError
from flctl.tensors import (
    TensorReader,
    TensorSpec,
    UpdateEncoding,
    UpdateReader,
    encode_update,
    expected_update_spec,
    read_metadata,
    read_spec,
    save_parameters,
    sha256_file,
)

MODEL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TRAVEL = {"float16": torch.float16, "bfloat16": torch.bfloat16}
UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}
TINY = {
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-133,
    torch.float32: 2.0**-149,
    torch.float64: 5e-324,
}


def write(path: Path, params: dict[str, torch.Tensor]) -> Path:
    save_parameters(params, path)
    return path


def bound(
    p: torch.Tensor, b: torch.Tensor, model: torch.dtype, encoding: str, dtype: str
) -> torch.Tensor:
    """The stated per-element error bound of this encoding, in float64."""
    travel = TRAVEL.get(dtype, model)
    p64, b64 = p.double(), b.double()
    if encoding == "full" and travel == model:
        return torch.zeros_like(p64)
    u_c = UNIT_ROUNDOFF[torch.float64 if model == torch.float64 else torch.float32]
    r = p64 if encoding == "full" else p64 - b64
    return (
        UNIT_ROUNDOFF[travel] * 1.001 * r.abs() + TINY[travel] + 2 * u_c * (p64.abs() + b64.abs())
    )


@st.composite
def trained_models(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base model and a trained one: weights of any scale, changes much smaller."""
    model = draw(st.sampled_from(MODEL_DTYPES))
    shapes = draw(
        st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=3)
    )
    weight_scale = draw(st.floats(1e-3, 1e3))
    change_scale = draw(st.floats(1e-6, 1.0)) * weight_scale
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    base: dict[str, torch.Tensor] = {}
    trained: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        b = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * weight_scale
        change = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * change_scale
        base[f"t{i}"] = b.to(model)
        trained[f"t{i}"] = (b + change).to(model)
    count = draw(st.integers(0, 2**62))
    base["count"] = torch.tensor([count, 1], dtype=torch.int64)
    trained["count"] = torch.tensor([count + 7, -3], dtype=torch.int64)
    return base, trained


@settings(max_examples=80, deadline=None)
@given(
    models=trained_models(),
    encoding=st.sampled_from(["full", "delta"]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_round_trip_within_the_stated_bounds(
    tmp_path_factory: pytest.TempPathFactory,
    models: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    encoding: str,
    dtype: str,
) -> None:
    folder = tmp_path_factory.mktemp("enc")
    base, trained = models
    base_path = write(folder / "base", base)
    encode_update(base_path, trained, folder / "u", encoding=encoding, dtype=dtype)
    model_spec = read_spec(base_path)
    # the file has exactly the spec the coordinator expects for this encoding
    got_spec = read_spec(folder / "u")
    want_spec = expected_update_spec(model_spec, encoding, dtype)
    assert {n: (s.dtype, s.shape) for n, s in got_spec.items()} == {
        n: (s.dtype, s.shape) for n, s in want_spec.items()
    }
    with TensorReader(base_path) as reader, UpdateReader(folder / "u", reader) as update:
        assert update.encoding.encoding == encoding
        assert update.is_delta == (encoding == "delta")
        for name, p in trained.items():
            rebuilt = update.read(name)
            if not p.is_floating_point():
                assert rebuilt.dtype == p.dtype
                assert torch.equal(rebuilt, p)
                continue
            model = p.dtype
            assert rebuilt.dtype == (torch.float64 if model == torch.float64 else torch.float32)
            error = (rebuilt.double() - p.double()).abs()
            limit = bound(p, base[name], model, encoding, dtype)
            assert bool((error <= limit).all()), float((error - limit).max())
            # read_delta is the same value less the base
            delta = update.read_delta(name, dtype=torch.float64)
            assert torch.allclose(delta + base[name].double(), rebuilt.double(), rtol=1e-6)


def test_full_in_the_model_dtype_is_the_plain_model_file(tmp_path: Path) -> None:
    params = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5, dtype=torch.float16),
        "n": torch.tensor(3, dtype=torch.int64),
    }
    base = write(tmp_path / "base", params)
    write(tmp_path / "plain", params)
    encode_update(base, params, tmp_path / "u", encoding="full", dtype="float32")
    assert (tmp_path / "u").read_bytes() == (tmp_path / "plain").read_bytes()
    assert read_metadata(tmp_path / "u") == {}
    # float32 means the model's own dtype: the float16 tensor stays float16
    assert read_spec(tmp_path / "u")["h"].dtype == "F16"


def test_metadata_names_the_encoding_and_the_base(tmp_path: Path) -> None:
    params = {"w": torch.randn(8)}
    base = write(tmp_path / "base", params)
    encode_update(base, params, tmp_path / "d", encoding="delta", dtype="bfloat16")
    assert read_metadata(tmp_path / "d") == {
        "flctl.encoding": "delta",
        "flctl.dtype": "bfloat16",
        "flctl.base": sha256_file(base),
    }
    encode_update(base, params, tmp_path / "f", encoding="full", dtype="float16")
    assert read_metadata(tmp_path / "f") == {"flctl.encoding": "full", "flctl.dtype": "float16"}
    assert read_spec(tmp_path / "f")["w"].dtype == "F16"
    # a caller that knows the base digest is trusted with it
    encode_update(
        base, params, tmp_path / "k", encoding="delta", dtype="float16", base_digest="ab" * 32
    )
    assert read_metadata(tmp_path / "k")["flctl.base"] == "ab" * 32


def test_half_precision_halves_the_floating_point_bytes(tmp_path: Path) -> None:
    params = {"w": torch.randn(256, 256), "n": torch.tensor([1, 2], dtype=torch.int64)}
    base = write(tmp_path / "base", params)
    sizes = {}
    for dtype in ("float32", "float16", "bfloat16"):
        encode_update(base, params, tmp_path / dtype, encoding="delta", dtype=dtype)
        sizes[dtype] = (tmp_path / dtype).stat().st_size
    data32 = 256 * 256 * 4
    assert sizes["float32"] - sizes["float16"] >= data32 // 2 - 64
    assert sizes["float16"] == sizes["bfloat16"]


def test_float16_overflow_is_refused_with_a_way_out(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.tensor([-4e4, 0.0])})
    trained = {"w": torch.tensor([4e4, 1.0])}  # each value fits float16; the delta does not
    with pytest.raises(InvalidInputError, match="overflow float16") as info:
        encode_update(base, trained, tmp_path / "u", encoding="delta", dtype="float16")
    assert info.value.hint is not None and "bfloat16" in info.value.hint
    assert not (tmp_path / "u").exists()
    with pytest.raises(InvalidInputError, match="overflow float16"):
        encode_update(
            base, {"w": torch.tensor([1e5, 0.0])}, tmp_path / "u", encoding="full", dtype="float16"
        )
    # bfloat16 has float32's range
    encode_update(base, trained, tmp_path / "u", encoding="delta", dtype="bfloat16")
    with TensorReader(base) as reader, UpdateReader(tmp_path / "u", reader) as update:
        assert torch.allclose(update.read("w"), trained["w"], rtol=2.0**-8, atol=0)


@pytest.mark.parametrize("encoding", ["full", "delta"])
def test_non_finite_values_are_refused(tmp_path: Path, encoding: str) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        encode_update(
            base,
            {"w": torch.tensor([0.0, float("nan"), 1.0])},
            tmp_path / "u",
            encoding=encoding,
            dtype="float32",
        )
    assert not (tmp_path / "u").exists()


def test_delta_against_a_different_base_is_refused(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    with pytest.raises(InvalidInputError, match="do not match the base"):
        encode_update(
            base, {"w": torch.zeros(4)}, tmp_path / "u", encoding="delta", dtype="float16"
        )


def test_update_reader_refuses_a_delta_from_another_model(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    other = write(tmp_path / "other", {"w": torch.ones(3)})
    encode_update(base, {"w": torch.ones(3)}, tmp_path / "u", encoding="delta", dtype="float16")
    with TensorReader(other) as reader:
        with pytest.raises(InconsistentUpdatesError, match="not from this round's model"):
            UpdateReader(tmp_path / "u", reader)
    with TensorReader(base) as reader:
        with pytest.raises(InconsistentUpdatesError, match="not from this round's model"):
            UpdateReader(tmp_path / "u", reader, base_digest="cd" * 32)
        with UpdateReader(tmp_path / "u", reader, base_digest=sha256_file(base)) as update:
            assert torch.equal(update.read("w"), torch.ones(3))


def test_update_reader_refuses_a_spec_that_does_not_fit_its_encoding(tmp_path: Path) -> None:
    base = write(tmp_path / "base", {"w": torch.zeros(3)})
    # float16 data in a file that claims to be the model's own dtype
    write(tmp_path / "u", {"w": torch.zeros(3, dtype=torch.float16)})
    with TensorReader(base) as reader:
        with pytest.raises(InconsistentUpdatesError, match="dtype F16"):
            UpdateReader(tmp_path / "u", reader)


def test_read_delta_refuses_integer_tensors(tmp_path: Path) -> None:
    params = {"n": torch.tensor([5]), "w": torch.ones(2)}
    base = write(tmp_path / "base", params)
    encode_update(base, params, tmp_path / "u", encoding="delta", dtype="float16")
    with TensorReader(base) as reader, UpdateReader(tmp_path / "u", reader) as update:
        assert torch.equal(update.read("n"), torch.tensor([5]))
        assert torch.equal(update.read_delta("w"), torch.zeros(2))
        with pytest.raises(ValueError, match="not floating-point"):
            update.read_delta("n")


def test_expected_update_spec() -> None:
    model = {
        "w": TensorSpec("w", "F32", (2, 3)),
        "d": TensorSpec("d", "F64", (1,)),
        "n": TensorSpec("n", "I64", ()),
    }
    half = expected_update_spec(model, "delta", "float16")
    assert {n: (s.dtype, s.shape) for n, s in half.items()} == {
        "w": ("F16", (2, 3)),
        "d": ("F16", (1,)),
        "n": ("I64", ()),
    }
    own = expected_update_spec(model, "full", "float32")
    assert {n: s.dtype for n, s in own.items()} == {"w": "F32", "d": "F64", "n": "I64"}
    # the wire's empty strings mean full, in the model's own dtype
    assert expected_update_spec(model, "", "") == own
    assert expected_update_spec(model, "full", "bfloat16")["w"].dtype == "BF16"
    with pytest.raises(InvalidInputError, match="unknown update encoding"):
        expected_update_spec(model, "sparse", "float16")
    with pytest.raises(InvalidInputError, match="unknown update dtype"):
        expected_update_spec(model, "full", "int8")


def test_update_encoding_from_the_wire_and_the_file() -> None:
    digest = "ef" * 32
    assert UpdateEncoding.from_header("", "") == UpdateEncoding()
    assert UpdateEncoding.from_header("full", "", digest) == UpdateEncoding()  # base ignored
    delta = UpdateEncoding.from_header("delta", "float16", digest)
    assert delta.to_metadata() == {
        "flctl.encoding": "delta",
        "flctl.dtype": "float16",
        "flctl.base": digest,
    }
    assert UpdateEncoding.from_metadata(delta.to_metadata()) == delta
    assert UpdateEncoding.from_metadata({}) == UpdateEncoding()
    assert UpdateEncoding().to_metadata() == {}
    assert delta.wire_dtype == "float16" and UpdateEncoding().wire_dtype == ""
    with pytest.raises(InvalidInputError, match="digest of its base"):
        UpdateEncoding.from_header("delta", "float16", "")
    with pytest.raises(InvalidInputError, match="unknown update dtype"):
        UpdateEncoding.from_metadata({"flctl.dtype": "float8"})


def test_read_metadata_refuses_a_malformed_map(tmp_path: Path) -> None:
    import json
    import struct

    header = json.dumps({"__metadata__": {"flctl.encoding": 3}}).encode()
    (tmp_path / "bad").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InvalidInputError, match="map of strings"):
        read_metadata(tmp_path / "bad")
