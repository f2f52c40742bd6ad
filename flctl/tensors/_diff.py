"""Comparing two models' tensors, and exporting a model for plain PyTorch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flctl.tensors._codec import load_parameters
from flctl.tensors._spec import read_spec
from flctl.tensors._stream import TensorReader

__all__ = ["diff_tensors", "save_torch_state_dict"]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def diff_tensors(path_a: Path, path_b: Path, *, same: bool = False) -> dict[str, Any]:
    """Per-tensor L2 distance, relative change ||b - a|| / ||a|| and max |b - a|.

    Reads one tensor of each file at a time with ``pread`` (never both models whole), in
    float64. Tensors only one side has are listed; shapes that differ get no distance.

    Args:
        path_a: The first model (safetensors).
        path_b: The second model.
        same: The files are known to be identical (equal digests): skip reading them.

    Returns:
        ``{"tensors": [...], "only_in_a": [...], "only_in_b": [...], "total": {...}}``;
        non-finite figures are None.
    """
    import torch

    spec_a, spec_b = read_spec(path_a), read_spec(path_b)
    common = sorted(set(spec_a) & set(spec_b))
    rows: list[dict[str, Any]] = []
    sq_diff = sq_a = max_abs = 0.0
    with TensorReader(path_a) as fa, TensorReader(path_b) as fb:
        for name in common:
            a, b = spec_a[name], spec_b[name]
            row: dict[str, Any] = {"name": name, "shape": list(a.shape), "dtype": a.dtype}
            if a.shape != b.shape:
                row.update(shape_b=list(b.shape), l2=None, relative=None, max_abs=None)
                rows.append(row)
                continue
            if b.dtype != a.dtype:
                row["dtype_b"] = b.dtype
            if same:
                row.update(l2=0.0, relative=0.0, max_abs=0.0)
                rows.append(row)
                continue
            ta = fa.read(name).to(torch.float64)
            delta = fb.read(name).to(torch.float64) - ta
            l2 = float(torch.linalg.vector_norm(delta))
            norm_a = float(torch.linalg.vector_norm(ta))
            peak = float(delta.abs().max()) if delta.numel() else 0.0
            del ta, delta
            sq_diff += l2 * l2
            sq_a += norm_a * norm_a
            max_abs = max(max_abs, peak) if math.isfinite(peak) else peak
            relative = l2 / norm_a if norm_a > 0 else (0.0 if l2 == 0 else math.inf)
            row.update(l2=_finite(l2), relative=_finite(relative), max_abs=_finite(peak))
            rows.append(row)
    total_l2 = math.sqrt(sq_diff)
    total_rel = total_l2 / math.sqrt(sq_a) if sq_a > 0 else (0.0 if total_l2 == 0 else math.inf)
    return {
        "tensors": rows,
        "only_in_a": sorted(set(spec_a) - set(spec_b)),
        "only_in_b": sorted(set(spec_b) - set(spec_a)),
        "total": {
            "l2": _finite(total_l2),
            "relative": _finite(total_rel),
            "max_abs": _finite(max_abs),
        },
    }


def save_torch_state_dict(source: Path, target: Path) -> None:
    """Write a safetensors model as a plain state dict with ``torch.save``.

    The file loads with ``torch.load(target, weights_only=True)``: tensors only, no pickled
    code.
    """
    import torch

    torch.save(dict(load_parameters(source)), target)
