"""The Strategy interface: how accepted updates become the next global model."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

__all__ = ["Strategy", "WeightedUpdate"]


@dataclass(frozen=True)
class WeightedUpdate:
    """One accepted update on disk (a safetensors file) and its aggregation weight."""

    path: Path
    num_examples: int
    client_id: str = ""


class Strategy(abc.ABC):
    """Combines a round's updates into a new model, reading them from disk.

    Implementations read updates tensor by tensor (memory-mapped safetensors) so that memory
    grows with the model, not with the number of clients.

    Example:
        ```python
        class KeepBase(Strategy):
            name = "keep-base"

            def aggregate(self, base, updates, out):
                shutil.copyfile(base, out)
        ```
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write the new model to ``out`` (a safetensors file).

        Args:
            base: The round's starting model (safetensors file).
            updates: Accepted updates; their tensor names, shapes and dtypes match ``base``.
            out: Where to write the result.

        Raises:
            NotEnoughUpdatesError: ``updates`` is empty.
            InconsistentUpdatesError: An update does not match ``base``.
        """
