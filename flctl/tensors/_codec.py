"""torch state dicts <-> safetensors files, and the checks an inbound update must pass."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.core.errors import InvalidInputError
from flctl.tensors._spec import TensorSpec, compare_specs, read_spec
from flctl.tensors._stream import TensorReader, TensorWriter

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_update",
    "load_parameters",
    "save_parameters",
    "sha256_file",
    "spec_of",
]

_TORCH_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def sha256_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """Hash a file in ``chunk_size`` reads (never loads it whole)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def spec_of(parameters: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return name -> (safetensors dtype, shape) for a state dict (for the fingerprint)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, tensor in parameters.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _TORCH_TO_ST:
            raise InvalidInputError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
        out[name] = (_TORCH_TO_ST[dtype], tuple(int(d) for d in tensor.shape))
    return out


def save_parameters(
    parameters: Mapping[str, torch.Tensor], path: Path, *, require_finite: bool = False
) -> None:
    """Write a state dict as a safetensors file, tensor by tensor (no copy of the model).

    Tensors on any device are moved to the CPU one at a time; tied or viewed tensors are
    written as independent data, as safetensors requires.

    Args:
        parameters: The state dict.
        path: Output file.
        require_finite: Refuse NaN and Inf (checked on each tensor as it is written).

    Raises:
        InvalidInputError: A value is not a tensor, has a dtype safetensors cannot hold, or
            (with ``require_finite``) holds NaN or Inf.
    """
    import torch

    for name, tensor in parameters.items():
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise InvalidInputError(f"parameter {name!r} is a {kind}, not a tensor")
    with TensorWriter(path, spec_of(parameters)) as writer:
        for name, tensor in parameters.items():
            if require_finite and tensor.is_floating_point():
                if not bool(torch.isfinite(tensor).all()):
                    raise InvalidInputError(f"tensor {name!r} holds NaN or Inf values")
            writer.write(name, tensor)


def load_parameters(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a state dict on ``device`` (one pread per tensor)."""
    with TensorReader(path) as reader:
        return {name: tensor.to(device) for name, tensor in reader}


def check_update(path: Path, expected: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """Check that an update file matches the model and holds only finite values.

    Reads one tensor at a time (memory-mapped), so memory stays near one tensor's size.

    Returns:
        The file's specs.

    Raises:
        InvalidInputError: Names, dtypes or shapes differ from ``expected``, or a value is NaN/Inf.
    """
    import torch

    specs = read_spec(path)
    compare_specs(expected, specs)
    with TensorReader(path) as reader:
        for name in specs:
            tensor = reader.read(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InvalidInputError(f"tensor {name!r} holds NaN or Inf values")
            del tensor
    return specs
