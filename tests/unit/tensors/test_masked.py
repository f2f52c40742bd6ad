"""SecAgg's flat vector of a model, and the masked-input file, written and read by chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flctl.core.errors import InvalidInputError
from flctl.tensors import (
    MaskedWriter,
    SecureLayout,
    StreamValidator,
    TensorSpec,
    iter_masked,
    masked_metadata,
    masked_spec,
    read_spec,
)


def test_the_layout_takes_float_tensors_by_name_and_ends_with_the_weight() -> None:
    spec = {
        "z.weight": TensorSpec("z.weight", "F32", (2, 3)),
        "a.bias": TensorSpec("a.bias", "F16", (4,)),
        "count": TensorSpec("count", "I64", (1,)),
        "m.bf": TensorSpec("m.bf", "BF16", (1, 1)),
    }
    layout = SecureLayout.of(spec)
    assert layout.tensors == (("a.bias", 0, 4), ("m.bf", 4, 1), ("z.weight", 5, 6))
    assert layout.num_elements == 12 and layout.weight_slot == 11


@pytest.mark.parametrize("bits", [32, 64])
def test_a_masked_input_round_trips_chunk_by_chunk_and_passes_the_upload_checks(
    tmp_path: Path, bits: int
) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    values = np.random.default_rng(bits).integers(0, 2**bits, 1001, dtype=dtype)
    path = tmp_path / "masked"
    with MaskedWriter(path, 1001, bits) as writer:
        for start in range(0, 1001, 300):
            writer.write(values[start : start + 300])
    read = [(o, c) for o, c in iter_masked(path, bits, chunk_elements=256)]
    assert [o for o, _ in read] == [0, 256, 512, 768]
    assert np.array_equal(np.concatenate([c for _, c in read]), values)
    assert read_spec(path) == {
        k: TensorSpec(k, v.dtype, v.shape, 0, 1001 * bits // 8)
        for k, v in masked_spec(1001, bits).items()
    }
    # the coordinator's stream check of an upload takes it as it is
    data = path.read_bytes()
    checker = StreamValidator(masked_spec(1001, bits), len(data), metadata=masked_metadata())
    for start in range(0, len(data), 777):
        checker.feed(data[start : start + 777])
    checker.finish()
    # and refuses one of another length
    other = StreamValidator(masked_spec(1000, bits), len(data), metadata=masked_metadata())
    with pytest.raises(
        InvalidInputError, match=r"shape \[1001\] differs from the model's \[1000\]"
    ):
        other.feed(data)


def test_the_writer_refuses_what_does_not_fit(tmp_path: Path) -> None:
    writer = MaskedWriter(tmp_path / "m", 4, 32)
    with pytest.raises(ValueError, match="expected uint32"):
        writer.write(np.zeros(2, dtype=np.uint64))
    with pytest.raises(ValueError, match="only 4 are left"):
        writer.write(np.zeros(5, dtype=np.uint32))
    writer.write(np.zeros(3, dtype=np.uint32))
    with pytest.raises(ValueError, match="1 elements were never written"):
        writer.close()


def test_a_file_that_is_no_masked_input_is_refused(tmp_path: Path) -> None:
    import torch

    from flctl.tensors import save_parameters

    path = tmp_path / "model"
    save_parameters({"w": torch.zeros(3)}, path)
    with pytest.raises(InvalidInputError, match="is not a masked input"):
        list(iter_masked(path, 32))
