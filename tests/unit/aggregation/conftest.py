"""Helpers of the aggregation tests: a round's files from NumPy stacks, and one torch thread."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from flctl.aggregation import WeightedUpdate
from flctl.tensors import encode_update, save_parameters


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module's tests (small tensors; the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def federation(
    folder: Path,
    stack: np.ndarray | Mapping[str, np.ndarray],
    weights: list[int] | None = None,
    encoding: str = "full",
) -> tuple[Path, list[WeightedUpdate]]:
    """A base of zeros and one update file per row of ``stack``, written under ``folder``.

    Update i holds ``stack[i]`` as tensor "w", or, when ``stack`` maps tensor names to stacks
    with the same first axis, ``stack[name][i]`` as each tensor ``name``; and a counter "n" = i
    (an integer tensor, so a test can tell which update a result came from). Its client id is
    ``f"c{i}"`` and its weight ``weights[i]`` (1 without weights).
    """
    stacks = {"w": stack} if isinstance(stack, np.ndarray) else dict(stack)
    count = len(next(iter(stacks.values())))
    assert all(len(s) == count for s in stacks.values()), "stacks of different lengths"
    base = {n: torch.zeros(s.shape[1:], dtype=torch.float32) for n, s in stacks.items()}
    save_parameters({**base, "n": torch.tensor(-1)}, folder / "base")
    updates = []
    for i in range(count):
        params = {n: torch.from_numpy(np.array(s[i])) for n, s in stacks.items()}
        params["n"] = torch.tensor(i)
        encode_update(folder / "base", params, folder / f"u{i}", encoding=encoding, dtype="float32")
        weight = weights[i] if weights else 1
        updates.append(WeightedUpdate(folder / f"u{i}", weight, f"c{i}"))
    return folder / "base", updates
