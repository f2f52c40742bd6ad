"""Tensor-at-a-time safetensors I/O: bounded memory for models of any size.

``safe_open`` maps the whole file, and every page a reader touches stays resident (and counts
in the process's peak RSS) until the file is closed: aggregating K updates that way holds K
models in the page cache of the process. Here each tensor is read with ``os.pread`` into its
own buffer and dropped after use, and a model is written header first, then tensor by tensor,
so neither side ever holds more than the tensor in hand.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from flctl.core.errors import InvalidInputError
from flctl.tensors._spec import DTYPE_SIZES, read_header, read_header_at

if TYPE_CHECKING:
    import torch

__all__ = ["TensorReader", "TensorWriter", "torch_dtype"]

_ST_TO_TORCH = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("F32" -> torch.float32)."""
    import torch

    return getattr(torch, _ST_TO_TORCH[st_dtype])  # type: ignore[no-any-return]


class TensorReader:
    """Reads one tensor at a time from a safetensors file with ``pread`` (no mapping).

    Args:
        path: The file; its header is validated on open.
        drop_cache: Each tensor's bytes leave the page cache once read (a file read once, such
            as an update being aggregated: the next reads reuse those pages instead of taking
            fresh memory; see :class:`~flctl.store.WriteBehind`).
    """

    def __init__(
        self,
        path: Path,
        *,
        drop_cache: bool = False,
        fd: int | None = None,
        size: int | None = None,
    ) -> None:
        self.path = path
        self._drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        if fd is None:
            self.specs, self.metadata = read_header(path)
            with path.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
            self._data_start = 8 + header_len
            self._fd = os.open(path, os.O_RDONLY)
            return
        # a file still arriving: its header is there, its tensors will fit ``size``
        if size is None:
            raise ValueError("a reader on an open file needs the size it will have")
        self._fd = fd
        try:
            self.specs, self.metadata, self._data_start = read_header_at(fd, size)
        except BaseException:
            self.close()
            raise

    def offset_of(self, name: str, element: int) -> int:
        """Where element ``element`` of tensor ``name`` (flattened) starts in the file."""
        spec = self.specs[name]
        return int(self._data_start + spec.begin + element * DTYPE_SIZES[spec.dtype])

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as a CPU tensor that owns its memory."""
        spec = self.specs[name]
        return self._pread(name, spec.begin, spec.end - spec.begin).reshape(spec.shape)

    def read_piece(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return elements ``start:stop`` of tensor ``name``, flattened (1-D, owns its memory)."""
        spec = self.specs[name]
        if not 0 <= start <= stop <= spec.numel:
            raise ValueError(f"elements {start}:{stop} are not in tensor {name!r}")
        itemsize = DTYPE_SIZES[spec.dtype]
        return self._pread(name, spec.begin + start * itemsize, (stop - start) * itemsize)

    def _pread(self, name: str, begin: int, size: int) -> torch.Tensor:
        import torch

        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            chunk = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
            if chunk <= 0:
                raise InvalidInputError(f"{self.path.name}: truncated tensor {name!r}")
            done += chunk
        if self._drop_cache and size:
            os.posix_fadvise(self._fd, self._data_start + begin, size, os.POSIX_FADV_DONTNEED)
        dtype = torch_dtype(self.specs[name].dtype)
        if size == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.specs:
            yield name, self.read(name)


class TensorWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time.

    Example:
        ```python
        with TensorWriter(path, specs) as writer:
            for name in specs:
                writer.write(name, compute(name))
        ```

    Args:
        path: Output file.
        specs: name -> (safetensors dtype, shape), in the order tensors will be written.
        metadata: Optional ``__metadata__`` strings.
        create: Create ``path`` if missing; False: it must exist (it is truncated), so a file
            its owner deleted meanwhile is never made again (FileNotFoundError).
    """

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, tuple[str, tuple[int, ...]]],
        *,
        metadata: Mapping[str, str] | None = None,
        create: bool = True,
    ) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._order: list[str] = []
        self._sizes: dict[str, int] = {}
        for name, (dtype, shape) in specs.items():
            n = 1
            for dim in shape:
                n *= dim
            size = n * DTYPE_SIZES[dtype]
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._order.append(name)
            self._sizes[name] = size
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        if create:
            self._fh: BinaryIO = path.open("wb")
        else:
            self._fh = os.fdopen(os.open(path, os.O_WRONLY | os.O_TRUNC), "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        #: bytes of the next tensor written so far (by :meth:`write_part`)
        self._part = 0
        self.path = path

    @property
    def handle(self) -> BinaryIO:
        """The file being written (to start its writeback early, say)."""
        return self._fh

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(complete=exc_type is None)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name`` (the next in order) to the file."""
        self._expect(name)
        if self._part:
            raise ValueError(f"tensor {name!r} is partly written: finish it with write_part")
        raw = _raw(tensor)
        if len(raw) != self._sizes[name]:
            raise ValueError(f"tensor {name!r} has {len(raw)} bytes, expected {self._sizes[name]}")
        self._fh.write(raw)
        self._next += 1

    def write_part(self, name: str, piece: torch.Tensor) -> None:
        """Append the next elements of tensor ``name`` (the next in order), in flat order.

        The tensor counts as written once its pieces hold all its bytes; an empty tensor is
        written by one empty piece.
        """
        self._expect(name)
        raw = _raw(piece)
        size = self._sizes[name]
        if self._part + len(raw) > size:
            raise ValueError(f"tensor {name!r}: pieces of more than its {size} bytes")
        self._fh.write(raw)
        self._part += len(raw)
        if self._part == size:
            self._next += 1
            self._part = 0

    def _expect(self, name: str) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"expected tensor {expected!r} next, got {name!r}")

    def close(self, *, complete: bool = True) -> None:
        """Flush and close; with ``complete``, check that every tensor was written."""
        if self._fh.closed:
            return
        self._fh.close()
        if complete and self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} tensors were never written")

    def write_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write every tensor, in order."""
        for name, tensor in tensors:
            self.write(name, tensor)


def _raw(tensor: torch.Tensor) -> bytes | memoryview:
    """The bytes of ``tensor`` (on the CPU, contiguous), as safetensors stores them."""
    data = tensor.detach().to("cpu").contiguous()
    if not data.numel():
        return b""
    return memoryview(data.view(-1).view(dtype=_byte_dtype()).numpy())  # type: ignore[arg-type]


def _byte_dtype() -> torch.dtype:
    import torch

    return torch.uint8
