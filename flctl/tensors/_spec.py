"""Tensor specs read from a safetensors header, and the task fingerprint built from them.

Reading a header needs no torch: it is 8 bytes of little-endian length and a JSON object. The
header is hostile input on the coordinator, so its size, its JSON and its offsets are checked
against the file before anything trusts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flctl.core.errors import InvalidInputError

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "TensorSpec",
    "compare_specs",
    "describe_spec_difference",
    "fingerprint",
    "read_metadata",
    "read_spec",
    "read_spec_bytes",
]

#: The safetensors dtype names flctl accepts, and their size in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

#: A header larger than this is refused (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor, and where its bytes lie in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def _parse_header(raw: bytes, data_size: int) -> dict[str, TensorSpec]:
    return _parse_header_and_metadata(raw, data_size)[0]


def _parse_metadata(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInputError("not a safetensors file: __metadata__ is not a map of strings")
    return metadata


def _parse_header_and_metadata(
    raw: bytes, data_size: int
) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidInputError("not a safetensors file: header is not a JSON object")
    specs: dict[str, TensorSpec] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise InvalidInputError(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise InvalidInputError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidInputError(f"tensor {name!r}: malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidInputError(f"tensor {name!r}: malformed data_offsets {offsets!r}")
        begin, end = offsets
        spec = TensorSpec(name, dtype, tuple(shape), begin, end)
        if not 0 <= begin <= end <= data_size or end - begin != spec.numel * DTYPE_SIZES[dtype]:
            raise InvalidInputError(
                f"tensor {name!r}: data_offsets {offsets!r} do not fit the file"
            )
        specs[name] = spec
        spans.append((begin, end))
    spans.sort()
    for (_, prev_end), (begin, _) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise InvalidInputError("not a safetensors file: tensor data overlaps")
    return specs, _parse_metadata(header)


def read_spec(path: Path) -> dict[str, TensorSpec]:
    """Read and validate the tensor specs of a safetensors file, without loading tensors.

    Raises:
        InvalidInputError: The file is truncated, its header malformed or inconsistent.
    """
    return _read_header(path)[0]


def read_metadata(path: Path) -> dict[str, str]:
    """Read the ``__metadata__`` strings of a safetensors file (empty when it has none).

    The whole header is validated, as :func:`read_spec` does.

    Raises:
        InvalidInputError: The file is truncated, its header malformed or inconsistent, or
            ``__metadata__`` is not a map of strings to strings.
    """
    return _read_header(path)[1]


def read_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Read and validate the tensor specs and ``__metadata__`` of a safetensors file.

    Raises:
        InvalidInputError: As :func:`read_metadata`.
    """
    return _read_header(path)


def _read_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise InvalidInputError("not a safetensors file: shorter than its 8-byte prefix")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidInputError(f"not a safetensors file: header length {header_len} is off")
        raw = fh.read(header_len)
    return _parse_header_and_metadata(raw, size - 8 - header_len)


def read_header_at(fd: int, size: int) -> tuple[dict[str, TensorSpec], dict[str, str], int]:
    """Read the header of a safetensors file open as ``fd``, of ``size`` bytes once whole.

    For a file still being written (an update arriving): only its prefix and header must be
    there already; the tensor offsets are checked against ``size``, not the current length.

    Returns:
        The tensor specs, the ``__metadata__`` strings and the offset of the data section.

    Raises:
        InvalidInputError: The header is incomplete, malformed or does not fit ``size``.
    """
    prefix = os.pread(fd, 8, 0)
    if len(prefix) != 8:
        raise InvalidInputError("not a safetensors file: shorter than its 8-byte prefix")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise InvalidInputError(f"not a safetensors file: header length {header_len} is off")
    raw = os.pread(fd, header_len, 8)
    if len(raw) != header_len:
        raise InvalidInputError("not a safetensors file: its header is cut short")
    specs, metadata = _parse_header_and_metadata(raw, size - 8 - header_len)
    return specs, metadata, 8 + header_len


def read_spec_bytes(data: bytes, *, data_size: int | None = None) -> dict[str, TensorSpec]:
    """Like :func:`read_spec`, for safetensors bytes in memory.

    Args:
        data: The file's bytes, or only its prefix and header when ``data_size`` is given.
        data_size: Size of the data section (after the header) the offsets must fit.
    """
    if len(data) < 8:
        raise InvalidInputError("not a safetensors file: shorter than its 8-byte prefix")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise InvalidInputError(f"not a safetensors file: header length {header_len} is off")
    if data_size is None:
        data_size = len(data) - 8 - header_len
    return _parse_header(data[8 : 8 + header_len], data_size)


def compare_specs(expected: Mapping[str, TensorSpec], got: Mapping[str, TensorSpec]) -> None:
    """Check that an update's tensors have exactly the model's names, shapes and dtypes.

    Raises:
        InvalidInputError: Naming the missing or unexpected tensors, or the first tensor whose
            shape or dtype differs.
    """
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}")
        raise InvalidInputError("update does not match the model: " + "; ".join(parts))
    for name, spec in got.items():
        want = expected[name]
        if spec.shape != want.shape:
            raise InvalidInputError(
                f"tensor {name!r}: shape {list(spec.shape)} differs from the model's "
                f"{list(want.shape)}"
            )
        if spec.dtype != want.dtype:
            raise InvalidInputError(
                f"tensor {name!r}: dtype {spec.dtype} differs from the model's {want.dtype}"
            )


def describe_spec_difference(
    expected: Mapping[str, TensorSpec],
    got: Mapping[str, Any],
    *,
    expected_name: str = "the coordinator's",
    limit: int = 3,
) -> str:
    """Say how a model description differs from ``expected``, in a few words.

    Args:
        expected: The reference model's specs.
        got: The other model's name -> ``(dtype, shape)`` (untrusted: any malformed entry is
            named as such).
        expected_name: How the reference is called in the text ("the coordinator's").
        limit: How many differences are named before "(and N more)".
    """
    problems: list[str] = []
    for name in sorted(set(expected) - set(got)):
        problems.append(f"missing tensor {name!r}")
    for name in sorted(set(got) - set(expected)):
        problems.append(f"unexpected tensor {name!r}")
    for name in sorted(set(expected) & set(got)):
        entry = got[name]
        want = expected[name]
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            problems.append(f"tensor {name!r}: malformed description")
        elif entry[0] != want.dtype:
            problems.append(f"tensor {name!r}: dtype {entry[0]} vs {expected_name} {want.dtype}")
        elif not isinstance(entry[1], list | tuple):
            problems.append(f"tensor {name!r}: malformed shape {entry[1]!r}")
        elif list(entry[1]) != list(want.shape):
            problems.append(
                f"tensor {name!r}: shape {list(entry[1])} vs {expected_name} {list(want.shape)}"
            )
    if not problems:
        return "the descriptions match but the fingerprints do not"
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def fingerprint(specs: Mapping[str, TensorSpec] | Mapping[str, Any]) -> str:
    """Hash a model's tensor names, dtypes and shapes (not values) into a task fingerprint.

    Clients send it at Join; a coordinator refuses a client whose model differs. Accepts the
    output of :func:`read_spec` or a mapping of name -> (dtype, shape).
    """
    items = []
    for name in sorted(specs):
        spec = specs[name]
        if isinstance(spec, TensorSpec):
            items.append([name, spec.dtype, list(spec.shape)])
        else:
            dtype, shape = spec
            items.append([name, str(dtype), [int(d) for d in shape]])
    canonical = json.dumps(items, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
