"""A model's update as SecAgg's flat vector, and the masked-input file a client uploads.

Secure aggregation masks one flat vector of integers per client (docs/secagg.md). Its layout
is a function of the round's model alone, so client and coordinator agree on it without
talking: every floating-point tensor of the model, in order of name, flattened (C order), one
after the other, then one last element, the client's weight (:data:`WEIGHT_SLOT`: the last
index). Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) are not part
of it: a securely aggregated model keeps the round's base values for them.

The masked input travels as an ordinary safetensors file through the resumable upload: one
tensor, :data:`MASKED_TENSOR`, of ``num_elements`` integers modulo ``2**32`` or ``2**64``,
stored as ``I32`` or ``I64`` (the same bytes as the unsigned values; safetensors' unsigned
dtypes are not flctl's), with ``__metadata__`` ``{"flctl.encoding": "secagg"}``. It is written
and read chunk by chunk (:class:`MaskedWriter`, :func:`iter_masked`), so neither side holds
more than a chunk of it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from flctl.core.errors import InvalidInputError
from flctl.tensors._spec import TensorSpec, read_metadata, read_spec

__all__ = [
    "MASKED_ENCODING",
    "MASKED_TENSOR",
    "MaskedWriter",
    "SecureLayout",
    "iter_masked",
    "masked_metadata",
    "masked_spec",
]

#: The one tensor of a masked-input file.
MASKED_TENSOR = "secagg.masked"
#: ``flctl.encoding`` of a masked-input file (and ``UploadHeader.encoding`` of its upload).
MASKED_ENCODING = "secagg"

_FLOATS = ("F64", "F32", "F16", "BF16")
_STORED = {32: "I32", 64: "I64"}


@dataclass(frozen=True)
class SecureLayout:
    """Where each floating-point tensor of a model lies in SecAgg's flat vector.

    Attributes:
        tensors: ``(name, offset, count)`` of each floating-point tensor, by name.
        num_elements: The vector's length: every float element, plus the weight slot.
    """

    tensors: tuple[tuple[str, int, int], ...]
    num_elements: int

    @classmethod
    def of(cls, spec: Mapping[str, TensorSpec]) -> SecureLayout:
        """The layout of the model whose tensors ``spec`` describes (:func:`read_spec`)."""
        offset = 0
        tensors: list[tuple[str, int, int]] = []
        for name in sorted(spec):
            if spec[name].dtype not in _FLOATS:
                continue
            count = spec[name].numel
            tensors.append((name, offset, count))
            offset += count
        return cls(tuple(tensors), offset + 1)

    @property
    def weight_slot(self) -> int:
        """The index of the weight element: the last one."""
        return self.num_elements - 1


def masked_spec(num_elements: int, modulus_bits: int) -> dict[str, TensorSpec]:
    """The tensors a masked-input file of ``num_elements`` holds (for the upload's checks)."""
    return {MASKED_TENSOR: TensorSpec(MASKED_TENSOR, _stored(modulus_bits), (num_elements,))}


def masked_metadata() -> dict[str, str]:
    """The ``flctl.*`` metadata a masked-input file carries."""
    return {"flctl.encoding": MASKED_ENCODING}


def _stored(modulus_bits: int) -> str:
    try:
        return _STORED[modulus_bits]
    except KeyError:
        raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits!r}") from None


def _unsigned(modulus_bits: int) -> np.dtype[Any]:
    return np.dtype(np.uint32 if modulus_bits == 32 else np.uint64).newbyteorder("<")


class MaskedWriter:
    """Writes a masked-input file front to back, one chunk of the vector at a time.

    Example:
        ```python
        with MaskedWriter(out, layout.num_elements, 32) as writer:
            for offset, chunk in masked_chunks:
                writer.write(chunk)
        ```

    Args:
        path: The file to write.
        num_elements: The vector's length.
        modulus_bits: 32 or 64.
    """

    def __init__(self, path: Path, num_elements: int, modulus_bits: int) -> None:
        if num_elements < 1:
            raise ValueError(f"num_elements must be >= 1, got {num_elements!r}")
        self._dtype = _unsigned(modulus_bits)
        size = num_elements * self._dtype.itemsize
        header: dict[str, Any] = {
            "__metadata__": masked_metadata(),
            MASKED_TENSOR: {
                "dtype": _stored(modulus_bits),
                "shape": [num_elements],
                "data_offsets": [0, size],
            },
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh: BinaryIO = path.open("wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._left = num_elements
        self.path = path

    def __enter__(self) -> MaskedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(complete=exc_type is None)

    def write(self, chunk: NDArray[Any]) -> None:
        """Append the next elements (unsigned integers of the file's width).

        Raises:
            ValueError: More elements than the vector holds, or another dtype.
        """
        if chunk.dtype.kind != "u" or chunk.dtype.itemsize != self._dtype.itemsize:
            raise ValueError(f"expected {self._dtype} elements, got {chunk.dtype}")
        if len(chunk) > self._left:
            raise ValueError(f"{len(chunk)} elements, but only {self._left} are left to write")
        self._fh.write(np.ascontiguousarray(chunk, dtype=self._dtype).tobytes())
        self._left -= len(chunk)

    def close(self, *, complete: bool = True) -> None:
        """Close; with ``complete``, check that the whole vector was written."""
        if self._fh.closed:
            return
        self._fh.close()
        if complete and self._left:
            raise ValueError(f"{self._left} elements were never written")


def iter_masked(
    path: Path, modulus_bits: int, *, chunk_elements: int = 1 << 20
) -> Iterator[tuple[int, NDArray[Any]]]:
    """Yield ``(offset, elements)`` of a masked-input file, a chunk at a time (``pread``).

    Args:
        path: The file (checked: one tensor :data:`MASKED_TENSOR` of the width asked, and the
            metadata of a masked input).
        modulus_bits: 32 or 64.
        chunk_elements: Elements per chunk.

    Raises:
        InvalidInputError: The file is not a masked input of that width.
    """
    spec = read_spec(path)
    if not masked_metadata().items() <= read_metadata(path).items() or set(spec) != {MASKED_TENSOR}:
        raise InvalidInputError(f"{path.name} is not a masked input")
    tensor = spec[MASKED_TENSOR]
    if tensor.dtype != _stored(modulus_bits) or len(tensor.shape) != 1:
        raise InvalidInputError(f"{path.name} is not a masked input of {modulus_bits} bits")
    dtype = _unsigned(modulus_bits)
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    start = 8 + header_len + tensor.begin
    total = tensor.shape[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, total, chunk_elements):
            count = min(chunk_elements, total - offset)
            size = count * dtype.itemsize
            data = os.pread(fd, size, start + offset * dtype.itemsize)
            if len(data) != size:
                raise InvalidInputError(f"{path.name}: truncated masked input")
            yield offset, np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
    finally:
        os.close(fd)
