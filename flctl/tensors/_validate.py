"""Checking a safetensors update while its bytes arrive, in one pass.

The header comes first: it is parsed and compared with the model (names, dtypes, shapes) as
soon as it is complete, so a wrong update is refused before its bulk is received. Every
floating-point value is then checked for NaN and Inf as it streams by, on its raw bits (the
exponent field all ones, per dtype: 11 bits for float64, 8 for float32 and bfloat16, 5 for
float16), which works alike for the model's dtype and the half-precision dtypes updates may
travel in (``client.update_dtype``), and needs no second read of the file.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

from flctl.core.errors import InvalidInputError, LimitExceededError
from flctl.tensors._spec import (
    MAX_HEADER_BYTES,
    TensorSpec,
    _parse_header_and_metadata,
    compare_specs,
)

__all__ = ["StreamValidator"]

# dtype -> (unsigned view, exponent mask)
_FLOAT_BITS: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}


class StreamValidator:
    """Validates a safetensors file fed in pieces.

    Args:
        expected: The specs the update must have: exactly these names, dtypes and shapes
            (offsets may differ). For an update in another encoding than the model's own,
            :func:`flctl.tensors.expected_update_spec` gives them.
        total_size: The size the upload announced.
        metadata: When given, the ``flctl.*`` keys of the file's ``__metadata__`` must be
            exactly these (``UpdateEncoding.to_metadata()``), so that a file whose encoding
            differs from what its upload header announced is refused with its header.

    Raises (from :meth:`feed` and :meth:`finish`):
        InvalidInputError: Header malformed or different from the model, metadata different
            from ``metadata``, a NaN or Inf, or the stream ends early.
    """

    def __init__(
        self,
        expected: Mapping[str, TensorSpec],
        total_size: int,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._expected = expected
        self._want_metadata = None if metadata is None else dict(metadata)
        self._metadata: dict[str, str] | None = None
        self._total = total_size
        self._received = 0
        self._prefix = bytearray()
        self._data_start = -1
        # (begin, end, dtype, name) of float tensors in the data section, by begin
        self._spans: list[tuple[int, int, str, str]] = []
        self._span = 0
        self._carry = b""  # bytes of an element split across two pieces
        self.specs: dict[str, TensorSpec] | None = None

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` strings (empty when it has none).

        Raises:
            RuntimeError: The header has not arrived yet.
        """
        if self._metadata is None:
            raise RuntimeError("the update's header has not arrived yet")
        return dict(self._metadata)

    def feed(self, data: bytes | memoryview) -> None:
        """Check the next piece of the file."""
        view = memoryview(data)
        start = self._received
        self._received += len(view)
        if self._data_start < 0:
            self._prefix += view
            if not self._parse_header():
                return
            # what followed the header in the prefix is tensor data
            body = memoryview(bytes(self._prefix[self._data_start :]))
            self._prefix = bytearray()
            self._check(body, 0)
            return
        self._check(view, start - self._data_start)

    def finish(self) -> dict[str, TensorSpec]:
        """Confirm the whole file arrived; return its specs."""
        if self.specs is None or self._received != self._total:
            raise InvalidInputError(
                f"truncated update: {self._received} of {self._total} bytes arrived"
            )
        return self.specs

    def _parse_header(self) -> bool:
        if len(self._prefix) < 8:
            return False
        (header_len,) = struct.unpack("<Q", self._prefix[:8])
        if header_len > MAX_HEADER_BYTES or 8 + header_len > self._total:
            raise LimitExceededError(f"safetensors header length {header_len} is off")
        if len(self._prefix) < 8 + header_len:
            return False
        # offsets are checked against the data size the upload announced
        header = bytes(self._prefix[8 : 8 + header_len])
        specs, metadata = _parse_header_and_metadata(header, self._total - 8 - header_len)
        if self._want_metadata is not None:
            ours = {k: v for k, v in metadata.items() if k.startswith("flctl.")}
            if ours != self._want_metadata:
                raise InvalidInputError(
                    f"update metadata {ours} differs from its upload header's {self._want_metadata}"
                )
        compare_specs(self._expected, specs)
        self.specs = specs
        self._metadata = metadata
        self._data_start = 8 + header_len
        self._spans = sorted(
            (s.begin, s.end, s.dtype, s.name) for s in specs.values() if s.dtype in _FLOAT_BITS
        )
        return True

    def _check(self, view: memoryview, offset: int) -> None:
        """Check the data bytes [offset, offset + len(view)) of the data section."""
        end = offset + len(view)
        while self._span < len(self._spans):
            begin, stop, dtype, name = self._spans[self._span]
            if begin >= end:
                return
            lo, hi = max(begin, offset), min(stop, end)
            if hi > lo:
                self._check_floats(view[lo - offset : hi - offset], dtype, name, hi == stop)
            if stop > end:
                return
            self._span += 1
            self._carry = b""

    def _check_floats(self, piece: memoryview, dtype: str, name: str, last: bool) -> None:
        kind, mask = _FLOAT_BITS[dtype]
        size = np.dtype(kind).itemsize
        data: bytes | memoryview = piece
        if self._carry:
            data = self._carry + bytes(piece)
            self._carry = b""
        whole = len(data) - len(data) % size
        if whole:
            bits = np.frombuffer(data, dtype=kind, count=whole // size)
            if bool(np.any((bits & kind(mask)) == kind(mask))):
                raise InvalidInputError(f"tensor {name!r} holds NaN or Inf values")
        if whole != len(data):
            self._carry = bytes(data[whole:])
