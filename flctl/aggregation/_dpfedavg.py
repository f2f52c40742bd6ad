"""DP-FedAvg with central noise: clipped deltas, equal weights, noise added by the coordinator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.aggregation._strategy import Strategy, WeightedUpdate
from flctl.aggregation._updates import open_updates, summation_order
from flctl.core.errors import InvalidInputError, NotEnoughUpdatesError, PrivacyError
from flctl.privacy import (
    AdaptiveClipping,
    clip_factor,
    gaussian_noise_like,
    noise_std,
    secure_generator,
)
from flctl.tensors import TensorReader, TensorWriter, UpdateReader, read_spec, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["DpFedAvg"]


class DpFedAvg(Strategy):
    """Client-level DP-FedAvg with central Gaussian noise (McMahan et al., 2018).

    For each update, the delta ``update - base`` is clipped to L2 norm ``clip_norm`` over all its
    floating-point tensors together (the norm is computed streaming, in float64, as
    :func:`flctl.privacy.delta_norm` does). A delta-encoded update's delta is used as it arrived
    (cast to float64), with no subtraction. The clipped deltas are averaged with **equal weights**
    over a **fixed denominator**, not over the number of updates received and not weighted by
    ``num_examples``: a client's example count is private, and a weight that depends on it (or on
    how many clients answered) would change the sum's sensitivity, which must stay ``clip_norm`` for
    the noise to give the accounted guarantee. The denominator is the expected number of clients per
    round: ``sampling_rate * population`` with Poisson sampling, ``sample_size`` with fixed-size
    sampling. Gaussian noise of std ``noise_multiplier * clip_norm / denominator`` is added to the
    average, tensor by tensor, from :func:`flctl.privacy.secure_generator` (seeded by the OS, never
    by the project seed). The new model is ``base + noisy average``; integer tensors (counters) are
    copied from the base model, never from a client.

    Memory: one accumulator plus one tensor per update read at a time (``pread``), as FedAvg.
    The clipped deltas are summed in a fixed order (by client id), not in their arrival order,
    so that with a seeded ``generator`` the result is the same bits however the updates came;
    the noise of a real run is drawn from the OS and differs every round by design.

    With ``adaptive`` (adaptive clipping, :class:`flctl.privacy.AdaptiveClipping`), the
    strategy also releases the noised fraction of updates whose norm was at most ``clip_norm``
    (:attr:`last_unclipped_fraction`), from the same generator; ``noise_multiplier`` is then the
    deltas' share of the noise (``AdaptiveClipping.update_noise_multiplier``).

    The model it writes is central DP's release: :class:`~flctl.aggregation.PrivateStrategy`
    hands that file to the configured strategy as the round's one update.

    Args:
        clip_norm: ``C``, > 0.
        noise_multiplier: ``z``, >= 0 (0 only in tests: no privacy).
        denominator: What the sum of clipped deltas is divided by, > 0.
        generator: Where the noise comes from; None draws a fresh secure generator per round.
            Tests may pass a seeded one.
        adaptive: Release the noised unclipped fraction too (adaptive clipping).
    """

    name = "dpfedavg"
    writes_in_order = True

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        denominator: float,
        generator: torch.Generator | None = None,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.denominator = float(denominator)
        self.std = noise_std(self.noise_multiplier, self.clip_norm, self.denominator)
        self._generator = generator
        self.adaptive = adaptive
        self.last_clip_factors: list[float] = []
        """The clip factor of each update in the last :meth:`aggregate` (for metrics and tests)."""
        self.last_norms: list[float] = []
        """The norm of each update's delta in the last :meth:`aggregate` (private: not released)."""
        self.last_unclipped_fraction: float | None = None
        """With ``adaptive``: the noised fraction of unclipped updates of the last round."""

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        """Write ``base + (sum of clipped deltas) / denominator + noise`` to ``out``."""
        import torch

        if not updates:
            raise NotEnoughUpdatesError("no updates to aggregate")
        base_spec = read_spec(base)
        shape_of = {n: (s.dtype, s.shape) for n, s in base_spec.items()}
        with ExitStack() as stack:
            base_reader = stack.enter_context(TensorReader(base))
            readers = open_updates(stack, base_reader, updates)
            factors, norms = [], []
            for reader, update in zip(readers, updates, strict=True):
                norm = _delta_norm(reader, base_reader)
                if not math.isfinite(norm):  # pragma: no cover - _delta_norm raises first
                    raise PrivacyError(f"update from {update.client_id!r} has a non-finite norm")
                norms.append(norm)
                factors.append(clip_factor(norm, self.clip_norm))
            self.last_clip_factors = factors
            self.last_norms = norms
            generator = self._generator or secure_generator()
            if self.adaptive is not None:
                unclipped = sum(1 for norm in norms if norm <= self.clip_norm)
                self.last_unclipped_fraction = self.adaptive.noisy_fraction(
                    unclipped, len(norms), self.denominator, generator
                )
            # summed in a fixed order, not the arrival order: the same updates (and the same
            # generator) give the same bits; the lists above stay in the order given
            order = summation_order(updates)
            writer = stack.enter_context(TensorWriter(out, shape_of))
            for name, spec in base_spec.items():
                dtype = torch_dtype(spec.dtype)
                base_tensor = base_reader.read(name)
                if not dtype.is_floating_point:
                    writer.write(name, base_tensor)
                    continue
                acc = torch.zeros(spec.shape, dtype=torch.float64)
                base64 = base_tensor.to(torch.float64)
                del base_tensor
                for i in order:
                    delta = readers[i].read_delta(name, dtype=torch.float64, base_tensor=base64)
                    acc.add_(delta, alpha=factors[i])
                    del delta
                acc.div_(self.denominator)
                if self.std > 0:
                    acc.add_(gaussian_noise_like(acc, self.std, generator))
                acc.add_(base64)
                writer.write(name, acc.to(dtype))
                del acc, base64


def _delta_norm(update: UpdateReader, base: TensorReader) -> float:
    """The L2 norm of an update's delta over every floating-point tensor, in float64."""
    import torch

    total = 0.0
    for name, spec in base.specs.items():
        if not torch_dtype(spec.dtype).is_floating_point:
            continue
        delta = update.read_delta(name, dtype=torch.float64).reshape(-1)
        total += float(torch.dot(delta, delta))
        del delta
    if not math.isfinite(total):
        raise InvalidInputError(f"{update.path.name} holds NaN or Inf values")
    return math.sqrt(total)
