import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flctl.core.errors import InvalidInputError
from flctl.tensors import (
    TensorReader,
    check_update,
    fingerprint,
    load_parameters,
    read_spec,
    read_spec_bytes,
    save_parameters,
    sha256_file,
    spec_of,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(1, 5))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        else:
            t = torch.randint(0, 100, shape, generator=gen).to(dtype)
        out[f"layer{i}.weight"] = t
    return out


@settings(max_examples=40, deadline=None)
@given(params=state_dicts())
def test_codec_round_trip(
    tmp_path_factory: pytest.TempPathFactory, params: dict[str, torch.Tensor]
) -> None:
    path = tmp_path_factory.mktemp("codec") / "m.safetensors"
    save_parameters(params, path)
    back = load_parameters(path)
    assert list(back) == sorted(params) or set(back) == set(params)
    for name, tensor in params.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor)
    specs = read_spec(path)
    assert fingerprint(specs) == fingerprint(spec_of(params))
    assert read_spec_bytes(path.read_bytes()) == specs


def test_fingerprint_ignores_values_not_shapes() -> None:
    a = {"w": torch.zeros(2, 3)}
    b = {"w": torch.ones(2, 3)}
    c = {"w": torch.zeros(3, 2)}
    d = {"w": torch.zeros(2, 3, dtype=torch.float16)}
    assert fingerprint(spec_of(a)) == fingerprint(spec_of(b))
    assert len({fingerprint(spec_of(x)) for x in (a, c, d)}) == 3


def test_sha256_file(tmp_path: Path) -> None:
    import hashlib

    data = b"x" * (3 << 20) + b"tail"
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def _raw(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"1234", "shorter than"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (_raw([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        (
            _raw({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unsupported dtype",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "malformed shape",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "do not fit",
        ),
        (
            _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 40]}}, b"\0" * 4),
            "do not fit",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlaps",
        ),
    ],
)
def test_bad_headers_refused(blob: bytes, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        read_spec_bytes(blob)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_never_crash_the_reader(blob: bytes) -> None:
    try:
        read_spec_bytes(blob)
    except InvalidInputError:
        pass


def test_check_update(tmp_path: Path) -> None:
    model = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    base = tmp_path / "base"
    save_parameters(model, base)
    expected = read_spec(base)

    def attempt(params: dict[str, torch.Tensor]) -> None:
        path = tmp_path / "u"
        save_parameters(params, path)
        check_update(path, expected)

    attempt({"w": torch.ones(2, 2), "b": torch.ones(2)})
    with pytest.raises(InvalidInputError, match="missing tensors"):
        attempt({"w": torch.ones(2, 2)})
    with pytest.raises(InvalidInputError, match="unexpected tensors"):
        attempt({"w": torch.ones(2, 2), "b": torch.ones(2), "x": torch.ones(1)})
    with pytest.raises(InvalidInputError, match="shape"):
        attempt({"w": torch.ones(2, 3), "b": torch.ones(2)})
    with pytest.raises(InvalidInputError, match="dtype"):
        attempt({"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.ones(2)})
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        attempt({"w": torch.tensor([[0.0, float("nan")], [0, 0]]), "b": torch.ones(2)})
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        attempt({"w": torch.ones(2, 2), "b": torch.tensor([1.0, float("inf")])})


def test_save_refuses_non_tensors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a tensor"):
        save_parameters({"w": [1, 2, 3]}, tmp_path / "x")  # type: ignore[dict-item]


def test_files_interoperate_with_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    params = {
        "b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "a": torch.randn(4),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
    }
    ours = tmp_path / "ours.safetensors"
    save_parameters(params, ours)
    theirs = load_file(str(ours))
    for name, tensor in params.items():
        assert torch.equal(theirs[name], tensor)
    save_file(params, str(tmp_path / "lib.safetensors"))
    back = load_parameters(tmp_path / "lib.safetensors")
    for name, tensor in params.items():
        assert torch.equal(back[name], tensor)


def test_tied_and_non_contiguous_tensors_are_written_as_data(tmp_path: Path) -> None:
    base = torch.randn(4, 4)
    params = {"w": base, "tied": base, "t": base.t(), "slice": base[:, 1]}
    save_parameters(params, tmp_path / "m")
    back = load_parameters(tmp_path / "m")
    for name, tensor in params.items():
        assert torch.equal(back[name], tensor)


def test_writer_refuses_out_of_order_and_missing(tmp_path: Path) -> None:
    from flctl.tensors import TensorWriter

    specs = {"a": ("F32", (2,)), "b": ("F32", (1,))}
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        with TensorWriter(tmp_path / "x", specs) as writer:
            writer.write("b", torch.zeros(1))
    with pytest.raises(ValueError, match="never written"):
        with TensorWriter(tmp_path / "y", specs) as writer:
            writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="bytes, expected"):
        with TensorWriter(tmp_path / "z", specs) as writer:
            writer.write("a", torch.zeros(3))


@settings(max_examples=20, deadline=None)
@given(params=state_dicts())
def test_a_reader_that_drops_the_cache_reads_the_same_tensors(
    tmp_path_factory: pytest.TempPathFactory, params: dict[str, torch.Tensor]
) -> None:
    path = tmp_path_factory.mktemp("drop") / "m.safetensors"
    save_parameters(params, path)
    with TensorReader(path) as cached, TensorReader(path, drop_cache=True) as dropping:
        for name, tensor in params.items():
            # twice: a dropped tensor is read again from the disk
            for _ in range(2):
                got = dropping.read(name)
                assert got.dtype == tensor.dtype and got.shape == tensor.shape
                assert torch.equal(got, tensor) and torch.equal(got, cached.read(name))


@settings(max_examples=20, deadline=None)
@given(params=state_dicts(), cut=st.integers(1, 4))
def test_pieces_written_and_read_give_the_tensors_back(
    tmp_path_factory: pytest.TempPathFactory, params: dict[str, torch.Tensor], cut: int
) -> None:
    """A model written piece by piece is the file save_parameters writes; pieces read back."""
    from flctl.tensors import TensorWriter

    folder = tmp_path_factory.mktemp("pieces")
    save_parameters(params, folder / "whole")
    specs = read_spec(folder / "whole")
    with TensorWriter(folder / "pieces", {n: (s.dtype, s.shape) for n, s in specs.items()}) as w:
        for name in specs:
            flat = params[name].reshape(-1)
            bounds = sorted({0, flat.numel(), *range(0, flat.numel(), cut)})
            if len(bounds) == 1:
                w.write_part(name, flat)  # an empty tensor: one empty piece
            for start, stop in zip(bounds, bounds[1:], strict=False):
                w.write_part(name, flat[start:stop])
    assert sha256_file(folder / "pieces") == sha256_file(folder / "whole")
    size = (folder / "whole").stat().st_size
    fd = os.open(folder / "whole", os.O_RDONLY)
    with TensorReader(folder / "whole", fd=fd, size=size) as reader:
        for name, tensor in params.items():
            flat = tensor.reshape(-1)
            n = flat.numel()
            assert torch.equal(reader.read_piece(name, n // 3, n), flat[n // 3 :])
            assert reader.offset_of(name, 0) == reader.offset_of(name, n) - flat.nbytes
        with pytest.raises(ValueError, match="not in tensor"):
            reader.read_piece(name, 0, n + 1)


def test_a_reader_of_a_file_still_arriving_checks_its_header_against_the_final_size(
    tmp_path: Path,
) -> None:
    from flctl.tensors import TensorWriter

    save_parameters({"w": torch.arange(6.0)}, tmp_path / "m")
    data = (tmp_path / "m").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    (tmp_path / "part").write_bytes(data[: 8 + header_len])  # the header arrived, no tensor yet
    fd = os.open(tmp_path / "part", os.O_RDONLY)
    with TensorReader(tmp_path / "part", fd=fd, size=len(data)) as reader:
        assert reader.specs["w"].shape == (6,)
    for size in (len(data) - 4, 4):  # the tensor would not fit; the header is not all there
        fd = os.open(tmp_path / "part", os.O_RDONLY)
        with pytest.raises(InvalidInputError):
            TensorReader(tmp_path / "part", fd=fd, size=size)
        with pytest.raises(OSError):
            os.fstat(fd)  # the reader closed the descriptor it was given
    with pytest.raises(ValueError, match="size it will have"):
        TensorReader(tmp_path / "part", fd=0)
    with TensorWriter(tmp_path / "x", {"a": ("F32", (2,))}) as writer:
        writer.write_part("a", torch.zeros(1))
        with pytest.raises(ValueError, match="partly written"):
            writer.write("a", torch.zeros(2))
        with pytest.raises(ValueError, match="more than"):
            writer.write_part("a", torch.zeros(2))
        writer.write_part("a", torch.zeros(1))
