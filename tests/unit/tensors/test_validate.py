from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InvalidInputError
from flctl.tensors import (
    StreamValidator,
    UpdateEncoding,
    check_update,
    encode_update,
    expected_update_spec,
    read_spec,
    save_parameters,
    sha256_file,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def feed_all(validator: StreamValidator, data: bytes, sizes: list[int]) -> None:
    pos = 0
    i = 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        validator.feed(memoryview(data)[pos : pos + step])
        pos += step
        i += 1
    validator.finish()


@st.composite
def updates(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], bool]:
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(
        st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=2), min_size=1, max_size=4)
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    params = {f"t{i}": torch.randn(tuple(s), generator=gen).to(dtype) for i, s in enumerate(shapes)}
    params["count"] = torch.tensor([3], dtype=torch.int64)
    bad = draw(st.booleans())
    if bad:
        name = draw(st.sampled_from([k for k in params if k != "count"]))
        flat = params[name].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")])
        )
    return params, bad


@settings(max_examples=80, deadline=None)
@given(case=updates(), sizes=st.lists(st.integers(1, 97), min_size=1, max_size=5))
def test_stream_verdict_equals_whole_file_check(
    tmp_path_factory: pytest.TempPathFactory, case: tuple, sizes: list[int]
) -> None:
    params, bad = case
    folder = tmp_path_factory.mktemp("v")
    model = {k: torch.zeros_like(v) for k, v in params.items()}
    save_parameters(model, folder / "model")
    save_parameters(params, folder / "update")
    expected = read_spec(folder / "model")
    data = (folder / "update").read_bytes()
    validator = StreamValidator(expected, len(data))
    if bad:
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            feed_all(validator, data, sizes)
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            check_update(folder / "update", expected)
    else:
        feed_all(validator, data, sizes)
        assert validator.specs == read_spec(folder / "update")


def test_wrong_shape_refused_at_the_header(tmp_path: Path) -> None:
    save_parameters({"w": torch.zeros(4, 4)}, tmp_path / "model")
    save_parameters({"w": torch.zeros(4, 5)}, tmp_path / "update")
    data = (tmp_path / "update").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    validator = StreamValidator(read_spec(tmp_path / "model"), len(data))
    with pytest.raises(InvalidInputError, match=r"shape \[4, 5\]"):
        validator.feed(data[: 8 + header_len])  # refused before any tensor byte arrives


def test_truncated_and_garbage(tmp_path: Path) -> None:
    save_parameters({"w": torch.zeros(4)}, tmp_path / "m")
    data = (tmp_path / "m").read_bytes()
    spec = read_spec(tmp_path / "m")
    validator = StreamValidator(spec, len(data))
    validator.feed(data[:-3])
    with pytest.raises(InvalidInputError, match="truncated"):
        validator.finish()
    with pytest.raises(InvalidInputError):
        StreamValidator(spec, 100).feed(
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 76
        )
    with pytest.raises(InvalidInputError):
        StreamValidator(spec, 20).feed(b"\xff" * 20)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_updates_and_their_metadata(tmp_path: Path, dtype: str) -> None:
    base = {"w": torch.randn(5, 7), "n": torch.tensor([2], dtype=torch.int64)}
    save_parameters(base, tmp_path / "model")
    trained = {"w": base["w"] + 0.01, "n": base["n"]}
    encode_update(tmp_path / "model", trained, tmp_path / "u", encoding="delta", dtype=dtype)
    data = (tmp_path / "u").read_bytes()
    model_spec = read_spec(tmp_path / "model")
    expected = expected_update_spec(model_spec, "delta", dtype)
    announced = UpdateEncoding("delta", dtype, sha256_file(tmp_path / "model"))
    validator = StreamValidator(expected, len(data), metadata=announced.to_metadata())
    with pytest.raises(RuntimeError, match="not arrived"):
        validator.metadata  # noqa: B018
    feed_all(validator, data, [13])
    assert validator.metadata == announced.to_metadata()
    # the model's own spec refuses the half-precision file at its header
    with pytest.raises(InvalidInputError, match=f"dtype {'F16' if dtype == 'float16' else 'BF16'}"):
        feed_all(StreamValidator(model_spec, len(data)), data, [4096])
    # a header that announced another encoding than the file's is refused
    other = UpdateEncoding("full", dtype).to_metadata()
    with pytest.raises(InvalidInputError, match="differs from its upload header"):
        feed_all(StreamValidator(expected, len(data), metadata=other), data, [4096])


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [
        (torch.float16, [0x7C00, 0xFC00, 0x7E00]),  # +Inf, -Inf, NaN: exponent 5 bits all ones
        (torch.bfloat16, [0x7F80, 0xFF80, 0x7FC0]),  # exponent 8 bits all ones
    ],
)
def test_half_precision_nan_and_inf_bits(
    tmp_path: Path, dtype: torch.dtype, bits: list[int]
) -> None:
    # the largest finite values pass: their exponent is one below all ones
    largest = 0x7BFF if dtype == torch.float16 else 0x7F7F
    finite = torch.tensor([largest, largest | 0x8000], dtype=torch.int32).to(torch.int16)
    save_parameters({"w": finite.view(dtype)}, tmp_path / "ok")
    data = (tmp_path / "ok").read_bytes()
    feed_all(StreamValidator(read_spec(tmp_path / "ok"), len(data)), data, [3])
    for pattern in bits:
        values = torch.tensor([0, pattern], dtype=torch.int32).to(torch.int16)
        save_parameters({"w": values.view(dtype)}, tmp_path / "bad")
        data = (tmp_path / "bad").read_bytes()
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            feed_all(StreamValidator(read_spec(tmp_path / "bad"), len(data)), data, [3])
