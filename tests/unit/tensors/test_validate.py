from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InvalidInputError
from flctl.tensors import StreamValidator, check_update, read_spec, save_parameters

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
