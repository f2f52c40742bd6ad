"""Differential privacy: clipping, noise and the privacy accountant (see docs/privacy.md)."""

__all__: list[str] = []
