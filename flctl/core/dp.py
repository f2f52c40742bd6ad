"""What a task tells its client about the round's differential privacy (the client must obey).

The coordinator puts its ``[privacy]`` mode, and for local DP the clip norm and noise
multiplier, into every task's config under ``flctl.privacy.*`` keys (:func:`task_entries`). The
client takes them out again before the user's ``fit`` sees the config (:func:`split_task`) and
applies exactly those: with ``mode = "local"`` it clips and noises its update itself, and never
uploads one without noise. A client whose own ``[privacy]`` mode is not ``"off"`` refuses a
task whose mode differs from it (:meth:`TaskPrivacy.refusal`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flctl.core.config import PrivacyConfig

__all__ = [
    "KEY_CLIP_NORM",
    "KEY_MODE",
    "KEY_NOISE_MULTIPLIER",
    "PRIVACY_PREFIX",
    "TaskPrivacy",
    "split_task",
]

#: The prefix of the task config keys that carry the task's privacy (the coordinator's own).
PRIVACY_PREFIX = "flctl.privacy."
KEY_MODE = "flctl.privacy.mode"
KEY_CLIP_NORM = "flctl.privacy.clip_norm"
KEY_NOISE_MULTIPLIER = "flctl.privacy.noise_multiplier"
_KEYS = (KEY_MODE, KEY_CLIP_NORM, KEY_NOISE_MULTIPLIER)


@dataclass(frozen=True)
class TaskPrivacy:
    """The privacy a task asks of its client.

    Attributes:
        mode: ``"off"``, ``"central"`` or ``"local"``.
        clip_norm: Local DP: ``C``; 0.0 otherwise.
        noise_multiplier: Local DP: ``z`` (each client's noise std is ``z * C``); 0.0 otherwise.
    """

    mode: str = "off"
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0

    @classmethod
    def of(cls, config: PrivacyConfig) -> TaskPrivacy:
        """What a coordinator with this ``[privacy]`` table asks of its clients."""
        if config.mode == "local":
            return cls("local", float(config.clip_norm), float(config.noise_multiplier))
        return cls(config.mode)

    @property
    def is_local(self) -> bool:
        """Whether the client must clip and noise its update before upload."""
        return self.mode == "local"

    def task_entries(self) -> dict[str, Any]:
        """The ``flctl.privacy.*`` entries of a task's config (none when privacy is off)."""
        if self.mode == "off":
            return {}
        if not self.is_local:
            return {KEY_MODE: self.mode}
        return {
            KEY_MODE: self.mode,
            KEY_CLIP_NORM: self.clip_norm,
            KEY_NOISE_MULTIPLIER: self.noise_multiplier,
        }

    def refusal(self, own: PrivacyConfig) -> str | None:
        """Why a client whose ``[privacy]`` table is ``own`` must not run this task, or None.

        A client with ``mode = "off"`` follows the task (local DP included). Otherwise the modes
        must match, and a local task must be well formed and noise at least as much as the
        client's own ``noise_multiplier`` asks.
        """
        if self.is_local and not (
            math.isfinite(self.clip_norm)
            and self.clip_norm > 0
            and math.isfinite(self.noise_multiplier)
            and self.noise_multiplier > 0
        ):
            return (
                f"the task asks for local DP with clip_norm {self.clip_norm!r} and "
                f"noise_multiplier {self.noise_multiplier!r}: both must be finite and > 0"
            )
        if own.mode == "off":
            return None
        if own.mode != self.mode:
            return (
                f"this client's privacy.mode is \"{own.mode}\" and the coordinator's is "
                f'"{self.mode}": the client refuses to take part'
            )
        if self.is_local and self.noise_multiplier < own.noise_multiplier:
            return (
                f"the coordinator asks for local noise multiplier {self.noise_multiplier:g}, "
                f"below this client's privacy.noise_multiplier ({own.noise_multiplier:g})"
            )
        return None


def split_task(config: Mapping[str, Any]) -> tuple[TaskPrivacy, dict[str, Any]]:
    """Take the ``flctl.privacy.*`` entries out of a task's config.

    Returns:
        The privacy the task asks for (mode ``"off"`` without entries), and the rest of the
        config, for the user's ``fit``.
    """
    rest = {k: v for k, v in config.items() if k not in _KEYS}
    mode = config.get(KEY_MODE, "off")

    def number(key: str) -> float:
        value = config.get(key, 0.0)
        return (
            float(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else math.nan
        )

    if mode == "local":
        return TaskPrivacy("local", number(KEY_CLIP_NORM), number(KEY_NOISE_MULTIPLIER)), rest
    return TaskPrivacy(str(mode)), rest
