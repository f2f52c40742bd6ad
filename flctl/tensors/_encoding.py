"""Update encodings: how a trained model travels back to the coordinator.

A client sends either its trained weights (``encoding = "full"``) or their difference from the
round's base model (``"delta"``), with floating-point tensors in the model's own dtype
(``dtype = "float32"``, flctl.toml's name for "keep the model's dtype") or cast to
``"float16"`` or ``"bfloat16"``. Integer tensors (counters) always travel unchanged. A delta
is small next to the weights it changes, so rounding it to half precision costs far less than
rounding the weights themselves: half the bytes of a float32 model, with the error below.

The file is an ordinary safetensors file whose ``__metadata__`` says how to read it:
``flctl.encoding``, ``flctl.dtype`` and, for a delta, ``flctl.base`` (the sha256 of the base
model). A full update in the model's dtype carries no metadata: it is byte for byte what
:func:`flctl.tensors.save_parameters` writes, and a file without metadata reads as one.

Error bounds, per element, for a trained value ``p``, its base value ``b``, the value that
travels ``r`` (``p`` for full, ``p - b`` for delta) and the value the coordinator rebuilds
``p'`` (float32 models; float64 models compute in float64, with 2^-52 for 2^-23):

==================  ==========================================================
full, float32       exact (the same bytes)
delta, float32      ``|p' - p| <= 2^-23 * (|p| + |b|)``
float16             ``|p' - p| <= 2^-11 * |r| + 2^-24 + 2^-23 * (|p| + |b|)``;
                    ``|r|`` must stay below 65504 (float16's largest value)
bfloat16            ``|p' - p| <= 2^-8 * |r| + 2^-23 * (|p| + |b|)``
==================  ==========================================================

``2^-11`` and ``2^-8`` are float16's and bfloat16's rounding (half an ulp, relative), 2^-24
float16's smallest step near zero, and ``2^-23 * (|p| + |b|)`` the float32 roundings of the
subtraction on the client and of the addition on the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.core.errors import InconsistentUpdatesError, InvalidInputError
from flctl.tensors._codec import sha256_file, spec_of
from flctl.tensors._spec import TensorSpec, compare_specs
from flctl.tensors._stream import TensorReader, TensorWriter, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "UPDATE_DTYPES",
    "UPDATE_ENCODINGS",
    "UpdateEncoding",
    "UpdateReader",
    "encode_update",
    "expected_update_spec",
]

#: The values ``client.update_encoding`` may take.
UPDATE_ENCODINGS = ("full", "delta")
#: The values ``client.update_dtype`` may take; "float32" keeps the model's own dtype.
UPDATE_DTYPES = ("float32", "float16", "bfloat16")

_FLOATS = {"F64", "F32", "F16", "BF16"}
_TRAVEL = {"float16": "F16", "bfloat16": "BF16"}
_KEY_ENCODING, _KEY_DTYPE, _KEY_BASE = "flctl.encoding", "flctl.dtype", "flctl.base"


@dataclass(frozen=True)
class UpdateEncoding:
    """How one update file is encoded.

    Attributes:
        encoding: ``"full"`` or ``"delta"``.
        dtype: ``"float32"`` (the model's own dtype), ``"float16"`` or ``"bfloat16"``.
        base_digest: For a delta, the sha256 of the model it is relative to; else empty.
    """

    encoding: str = "full"
    dtype: str = "float32"
    base_digest: str = ""

    def __post_init__(self) -> None:
        _check_names(self.encoding, self.dtype)
        if self.encoding == "delta" and not self.base_digest:
            raise InvalidInputError("a delta update must name the digest of its base model")
        if self.encoding == "full" and self.base_digest:
            raise InvalidInputError("a full update names no base model")

    @property
    def is_lossless_full(self) -> bool:
        """Whether this is the plain model file (full, in the model's own dtype)."""
        return self.encoding == "full" and self.dtype == "float32"

    @classmethod
    def from_header(cls, encoding: str, dtype: str, base_digest: str = "") -> UpdateEncoding:
        """Read the wire's fields (``UploadHeader.encoding``, ``dtype``, ``base_digest``).

        An empty ``encoding`` means ``"full"`` and an empty ``dtype`` the model's own
        (``"float32"``); a full update's ``base_digest`` is ignored.

        Raises:
            InvalidInputError: An unknown encoding or dtype, or a delta without a base.
        """
        encoding = encoding or "full"
        return cls(encoding, dtype or "float32", base_digest if encoding == "delta" else "")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> UpdateEncoding:
        """Read a file's ``__metadata__`` (no ``flctl.*`` keys: a full update).

        Raises:
            InvalidInputError: An unknown encoding or dtype, or a delta without a base.
        """
        return cls(
            metadata.get(_KEY_ENCODING, "full"),
            metadata.get(_KEY_DTYPE, "float32"),
            metadata.get(_KEY_BASE, ""),
        )

    def to_metadata(self) -> dict[str, str]:
        """The ``flctl.*`` metadata a file in this encoding carries (none for the plain model)."""
        if self.is_lossless_full:
            return {}
        out = {_KEY_ENCODING: self.encoding, _KEY_DTYPE: self.dtype}
        if self.base_digest:
            out[_KEY_BASE] = self.base_digest
        return out

    @property
    def wire_dtype(self) -> str:
        """``UploadHeader.dtype``: empty for the model's own dtype."""
        return "" if self.dtype == "float32" else self.dtype


def _check_names(encoding: str, dtype: str) -> None:
    if encoding not in UPDATE_ENCODINGS:
        raise InvalidInputError(f"unknown update encoding {encoding!r}: expected 'full' or 'delta'")
    if dtype not in UPDATE_DTYPES:
        raise InvalidInputError(
            f"unknown update dtype {dtype!r}: expected 'float32', 'float16' or 'bfloat16'"
        )


def _travel_dtype(model_dtype: str, dtype: str) -> str:
    if model_dtype not in _FLOATS:
        return model_dtype
    return _TRAVEL.get(dtype, model_dtype)


def expected_update_spec(
    model_spec: Mapping[str, TensorSpec], encoding: str, dtype: str
) -> dict[str, TensorSpec]:
    """The names, dtypes and shapes an update in this encoding has, for a model's specs.

    Floating-point tensors travel in ``dtype`` (the model's own for ``"float32"``), with the
    model's shapes; integer tensors are unchanged. The empty strings of the wire
    (``UploadHeader.encoding`` and ``dtype``) mean ``"full"`` and ``"float32"``.

    Args:
        model_spec: The model's specs (:func:`flctl.tensors.read_spec`).
        encoding: ``"full"`` or ``"delta"`` (the spec is the same for both).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        InvalidInputError: An unknown encoding or dtype.
    """
    dtype = dtype or "float32"
    _check_names(encoding or "full", dtype)
    return {
        name: TensorSpec(name, _travel_dtype(spec.dtype, dtype), spec.shape)
        for name, spec in model_spec.items()
    }


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    import torch

    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def encode_update(
    base: Path,
    parameters: Mapping[str, torch.Tensor],
    out: Path,
    *,
    encoding: str,
    dtype: str,
    base_digest: str | None = None,
) -> None:
    """Write a trained model as an update file in the given encoding, tensor by tensor.

    A delta is computed in float32 (float64 for float64 models) from the base tensor, read
    with ``pread`` one at a time, so memory stays at ``parameters`` plus one tensor. With
    ``encoding="full"`` and ``dtype="float32"`` the file is exactly what
    :func:`flctl.tensors.save_parameters` writes (no metadata): the lossless default.

    Args:
        base: The round's model (safetensors); read only for a delta.
        parameters: The trained state dict; the same names, dtypes and shapes as ``base``.
        out: Output file.
        encoding: ``"full"`` or ``"delta"``.
        dtype: ``"float32"`` (the model's own dtype), ``"float16"`` or ``"bfloat16"``.
        base_digest: The sha256 of ``base`` when the caller knows it; computed otherwise.

    Raises:
        InvalidInputError: An unknown encoding or dtype, parameters that differ from the base,
            a NaN or Inf, or a value too large for float16 (``out`` is then removed).
    """
    import torch

    for name, tensor in parameters.items():
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise InvalidInputError(f"parameter {name!r} is a {kind}, not a tensor")
    is_delta = encoding == "delta"
    enc = UpdateEncoding(encoding, dtype, (base_digest or sha256_file(base)) if is_delta else "")
    model_spec = spec_of(parameters)
    specs = {n: (_travel_dtype(d, enc.dtype), shape) for n, (d, shape) in model_spec.items()}
    reader = TensorReader(base) if is_delta else None
    try:
        if reader is not None:
            theirs = {n: (s.dtype, s.shape) for n, s in reader.specs.items()}
            if theirs != model_spec:
                raise InvalidInputError(
                    "the parameters do not match the base model's tensor names, shapes or dtypes"
                )
        with TensorWriter(out, specs, metadata=enc.to_metadata()) as writer:
            for name, tensor in parameters.items():
                writer.write(name, _encode_tensor(name, tensor, reader, specs[name][0], enc))
    except BaseException:
        out.unlink(missing_ok=True)  # never leave half an update behind
        raise
    finally:
        if reader is not None:
            reader.close()


def _encode_tensor(
    name: str,
    tensor: torch.Tensor,
    base: TensorReader | None,
    travel: str,
    enc: UpdateEncoding,
) -> torch.Tensor:
    import torch

    if not tensor.is_floating_point():
        return tensor
    value = tensor.detach()
    if base is not None:
        compute = _compute_dtype(value)
        value = value.to("cpu", compute) - base.read(name).to(compute)
    if not bool(torch.isfinite(value).all()):
        if base is not None and bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(f"tensor {name!r}: the delta from the base model overflows")
        raise InvalidInputError(f"tensor {name!r} holds NaN or Inf values")
    out = value.to(torch_dtype(travel))
    if out is not value and not bool(torch.isfinite(out).all()):
        peak = float(value.abs().max())
        what = "its delta from the base model" if enc.encoding == "delta" else "its values"
        hint = 'set `client.update_dtype = "float32"`'
        if enc.dtype == "float16":
            hint = 'set `client.update_dtype = "bfloat16"` (float32\'s range) or "float32"'
        raise InvalidInputError(
            f"tensor {name!r}: {what} (up to {peak:.4g}) overflow {enc.dtype}, whose largest "
            f"value is {torch.finfo(out.dtype).max:.4g}",
            hint=hint,
        )
    return out


class UpdateReader:
    """Reads an update in any encoding back as the model's values, one tensor at a time.

    Opening it checks the file's tensors against the base model in the file's own encoding
    (:func:`expected_update_spec`) and, for a delta, that it is relative to this base.
    Floating-point tensors come back in the precision aggregation accumulates in: float32
    (float64 for float64 models); integer tensors as stored (the model's dtype).

    Example:
        ```python
        with TensorReader(base) as model, UpdateReader(path, model) as update:
            for name in model.specs:
                acc[name] += weight * update.read(name)
        ```

    Args:
        path: The update file.
        base: A reader on the round's base model (not closed by this reader).
        base_digest: The sha256 of the base; computed from ``base`` when a delta needs it and
            it is not given.
        drop_cache: Drop each tensor from the page cache once read (see
            :class:`TensorReader`).
        fd: Read this open file (the reader closes it) instead of opening ``path``: a file
            still arriving, whose header is there (see :class:`TensorReader`).
        size: The size ``fd``'s file will have.

    Raises:
        InconsistentUpdatesError: The update's tensors do not match the model in its
            encoding, its metadata is unreadable, or a delta is relative to another model.
    """

    def __init__(
        self,
        path: Path,
        base: TensorReader,
        base_digest: str | None = None,
        *,
        drop_cache: bool = False,
        fd: int | None = None,
        size: int | None = None,
    ) -> None:
        self.path = path
        self._base = base
        try:
            self._reader = TensorReader(path, drop_cache=drop_cache, fd=fd, size=size)
            self.encoding = UpdateEncoding.from_metadata(self._reader.metadata)
        except InvalidInputError as exc:
            self.close()
            raise InconsistentUpdatesError(f"{path.name}: {exc.message}") from exc
        try:
            expected = expected_update_spec(base.specs, self.encoding.encoding, self.encoding.dtype)
            compare_specs(expected, self._reader.specs)
            if self.is_delta:
                digest = base_digest or sha256_file(base.path)
                if self.encoding.base_digest != digest:
                    raise InconsistentUpdatesError(
                        f"{path.name} is a delta from model {self.encoding.base_digest[:12]}, "
                        f"not from this round's model {digest[:12]}"
                    )
        except InvalidInputError as exc:
            self.close()
            raise InconsistentUpdatesError(f"{path.name}: {exc.message}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def is_delta(self) -> bool:
        """Whether the file holds differences from the base model."""
        return self.encoding.encoding == "delta"

    def __enter__(self) -> UpdateReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the update file (the base reader stays open)."""
        if hasattr(self, "_reader"):
            self._reader.close()

    def _precision(self, name: str, dtype: torch.dtype | None) -> torch.dtype:
        import torch

        if dtype is not None:
            return dtype
        return torch.float64 if self._base.specs[name].dtype == "F64" else torch.float32

    def read(
        self,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        base_tensor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the client's value of tensor ``name``: the full value, or base + delta.

        Args:
            name: The tensor.
            dtype: Precision of a floating-point result (default float32, float64 for float64
                models); integer tensors are returned as stored.
            base_tensor: The base's tensor ``name`` when the caller has read it already (one
                read for all updates); never modified.
        """
        value = self._reader.read(name)
        if not value.is_floating_point():
            return value
        precision = self._precision(name, dtype)
        value = value.to(precision)
        if self.is_delta:
            base = base_tensor if base_tensor is not None else self._base.read(name)
            value.add_(base.to(precision))
        return value

    def read_piece(
        self,
        name: str,
        start: int,
        stop: int,
        *,
        dtype: torch.dtype | None = None,
        base_piece: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like :meth:`read`, for elements ``start:stop`` of tensor ``name`` (flattened).

        Args:
            name: The tensor.
            start: Its first element wanted (flat index).
            stop: One past the last element wanted.
            dtype: As for :meth:`read`.
            base_piece: The base's elements ``start:stop`` of ``name`` when the caller has read
                them already; never modified.
        """
        value = self._reader.read_piece(name, start, stop)
        if not value.is_floating_point():
            return value
        precision = self._precision(name, dtype)
        value = value.to(precision)
        if self.is_delta:
            base = base_piece
            if base is None:
                base = self._base.read_piece(name, start, stop)
            value.add_(base.to(precision))
        return value

    def offset_of(self, name: str, element: int) -> int:
        """Where element ``element`` of tensor ``name`` (flattened) starts in the update file."""
        return self._reader.offset_of(name, element)

    def read_delta(
        self,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        base_tensor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``update - base`` for floating-point tensor ``name`` (as stored for a delta).

        Args:
            name: A floating-point tensor.
            dtype: Precision of the result (default float32, float64 for float64 models).
            base_tensor: As for :meth:`read`.

        Raises:
            ValueError: ``name`` is an integer tensor.
        """
        value = self._reader.read(name)
        if not value.is_floating_point():
            raise ValueError(f"tensor {name!r} is not floating-point: it has no delta")
        precision = self._precision(name, dtype)
        if self.is_delta:
            return value.to(precision)
        base = base_tensor if base_tensor is not None else self._base.read(name)
        return value.to(precision).sub_(base.to(precision))
