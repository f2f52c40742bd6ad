"""What SecAgg+ clients and the coordinator exchange in a round: plain dataclasses of bytes.

One round runs these stages (Bell et al., CCS 2020, as Flower's SecAgg+ runs them):

0. setup: the coordinator sends every selected client the same :class:`SecAggSetup`.
1. ``advertise_keys``: each client answers a :class:`KeyAdvertisement` (two X25519 public keys).
2. ``share_keys``: each client gets its neighbours' keys (:class:`ShareKeysRequest`) and answers
   its encrypted Shamir shares, one per neighbour (:class:`ShareKeysReply`).
3. ``masked_input``: each client gets the shares addressed to it and the list of clients that
   shared keys (:class:`MaskedInputRequest`) and uploads its masked update.
4. ``unmask``: each client gets the list of clients whose masked update arrived
   (:class:`UnmaskRequest`) and answers shares of their self-mask seeds and shares of the mask
   keys of the clients that dropped (:class:`UnmaskReply`).

Nothing here needs the transport: the engine moves these objects, the gRPC layer converts them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from flctl.core.errors import SecAggThresholdError
from flctl.security._secagg import EncryptedShare

__all__ = [
    "KeyAdvertisement",
    "MaskedInputRequest",
    "SecAggSetup",
    "SecAggStage",
    "ShareKeysReply",
    "ShareKeysRequest",
    "UnmaskReply",
    "UnmaskRequest",
]

_SEED_BYTES = 32
_MAX_QUANTIZATION_BITS = 32
_GRAPH_INFO = b"flctl-secagg-v1 graph"
_MAX_PARTICIPANTS = 2**16 - 1  # Shamir x-coordinates are 16-bit


class SecAggStage(StrEnum):
    """A SecAgg round's stages, in order (what the protocol is waiting for)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


@dataclass(frozen=True)
class SecAggSetup:
    """A round's public SecAgg parameters, the same for every participant.

    Make one with :meth:`create`. Client ``participants[i]`` has the Shamir x-coordinate
    ``i + 1``. Both sides quantize with
    ``flctl.tensors.Quantizer(clip_range, quantization_bits, len(participants))``, whose
    ``modulus_bits`` equals this setup's.

    Attributes:
        server_round: The round's number.
        round_seed: 32 public random bytes: HKDF's salt, bound into every share's encryption,
            and the seed of the neighbour graph.
        participants: The selected clients' ids, sorted, distinct.
        threshold: ``t``: how many shares of a secret recover it.
        num_neighbours: How many other clients each client shares with (``n - 1``: all).
        clip_range: Update values are clipped to ``[-clip_range, clip_range]``.
        quantization_bits: Bits per quantized value.
        modulus_bits: 32 or 64: masked inputs are integers modulo ``2**modulus_bits``.
        num_elements: Length of the flat update vector.
    """

    server_round: int
    round_seed: bytes
    participants: tuple[str, ...]
    threshold: int
    num_neighbours: int
    clip_range: float
    quantization_bits: int
    modulus_bits: int
    num_elements: int

    def __post_init__(self) -> None:
        n = len(self.participants)
        if self.server_round < 1:
            raise ValueError(f"server_round must be >= 1, got {self.server_round!r}")
        if not isinstance(self.round_seed, bytes) or len(self.round_seed) != _SEED_BYTES:
            raise ValueError(f"round_seed must be {_SEED_BYTES} bytes")
        if list(self.participants) != sorted(set(self.participants)) or n < 2:
            raise ValueError(
                f"participants must be at least 2 distinct sorted ids, got {self.participants!r}"
            )
        if n > _MAX_PARTICIPANTS:
            raise ValueError(f"a SecAgg round takes at most {_MAX_PARTICIPANTS} clients, got {n}")
        if not 1 <= self.num_neighbours <= n - 1:
            raise ValueError(f"num_neighbours must be in 1..{n - 1}, got {self.num_neighbours!r}")
        if self.num_neighbours < n - 1 and self.num_neighbours % 2:
            raise ValueError(f"num_neighbours below n - 1 must be even, got {self.num_neighbours}")
        size = self.num_neighbours + 1
        if not size / 2 < self.threshold <= size:
            raise ValueError(
                f"threshold must be above half of the {size} shares and at most {size}, "
                f"got {self.threshold!r}"
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be finite and > 0, got {self.clip_range!r}")
        if not 1 <= self.quantization_bits <= _MAX_QUANTIZATION_BITS:
            raise ValueError(
                f"quantization_bits must be in 1..{_MAX_QUANTIZATION_BITS}, "
                f"got {self.quantization_bits!r}"
            )
        if self.modulus_bits != _modulus_bits(n, self.quantization_bits):
            raise ValueError(
                f"{n} clients at {self.quantization_bits} bits need modulus_bits "
                f"{_modulus_bits(n, self.quantization_bits)}, got {self.modulus_bits!r}"
            )
        if self.num_elements < 1:
            raise ValueError(f"num_elements must be >= 1, got {self.num_elements!r}")

    @classmethod
    def create(
        cls,
        server_round: int,
        participants: Sequence[str],
        *,
        threshold: float,
        num_shares: int,
        clip_range: float,
        quantization_bits: int,
        num_elements: int,
        round_seed: bytes | None = None,
    ) -> SecAggSetup:
        """Make a round's setup from the ``[secagg]`` settings.

        Args:
            server_round: The round's number.
            participants: The selected clients' ids (any order).
            threshold: The fraction of a client's share holders (itself and its neighbours)
                needed to recover its secrets, in ``(0.5, 1]``: above one half, so no two
                disjoint groups of clients can each recover one of a client's two secrets.
            num_shares: Neighbours each client shares with (SecAgg+); 0 or at least
                ``n - 1``: every other client (plain SecAgg). An odd number is rounded up to
                the next even one (each client shares with ``num_shares / 2`` clients on each
                side of it on a ring shuffled by the round seed).
            clip_range: See :class:`SecAggSetup`.
            quantization_bits: See :class:`SecAggSetup`.
            num_elements: See :class:`SecAggSetup`.
            round_seed: 32 public random bytes; fresh from the operating system when omitted.

        Returns:
            The setup.

        Raises:
            SecAggThresholdError: Fewer than 2 participants.
            ValueError: Any other argument is out of range.
        """
        ids = tuple(sorted(set(participants)))
        if len(ids) < 2:
            raise SecAggThresholdError(
                f"secure aggregation needs at least 2 clients in a round, got {len(ids)}"
            )
        if not 0.5 < threshold <= 1:
            raise ValueError(f"threshold must be in (0.5, 1], got {threshold!r}")
        if num_shares < 0:
            raise ValueError(f"num_shares must be >= 0, got {num_shares!r}")
        n = len(ids)
        neighbours = n - 1 if num_shares == 0 else min(n - 1, num_shares + num_shares % 2)
        size = neighbours + 1
        # round() first: 0.7 * 10 is 7.000000000000001 in floats, whose ceil would be 8.
        t = max(math.floor(size / 2) + 1, math.ceil(round(threshold * size, 9)))
        return cls(
            server_round=server_round,
            round_seed=os.urandom(_SEED_BYTES) if round_seed is None else round_seed,
            participants=ids,
            threshold=min(t, size),
            num_neighbours=neighbours,
            clip_range=float(clip_range),
            quantization_bits=quantization_bits,
            modulus_bits=_modulus_bits(n, quantization_bits),
            num_elements=num_elements,
        )

    def index(self, client_id: str) -> int:
        """Return a participant's Shamir x-coordinate (its position in the sorted ids, from 1).

        Raises:
            KeyError: ``client_id`` is not a participant.
        """
        return self._indices[client_id]

    def neighbours(self, client_id: str) -> tuple[str, ...]:
        """Return the clients ``client_id`` shares with and masks against, sorted.

        Raises:
            KeyError: ``client_id`` is not a participant.
        """
        return self._graph[client_id]

    def holders(self, client_id: str) -> tuple[str, ...]:
        """Return who holds shares of ``client_id``'s secrets: itself and its neighbours, sorted.

        Raises:
            KeyError: ``client_id`` is not a participant.
        """
        return self._holders[client_id]

    @functools.cached_property
    def _holders(self) -> dict[str, tuple[str, ...]]:
        return {c: tuple(sorted((c, *self._graph[c]))) for c in self.participants}

    @functools.cached_property
    def _indices(self) -> dict[str, int]:
        return {cid: i + 1 for i, cid in enumerate(self.participants)}

    @functools.cached_property
    def _graph(self) -> dict[str, tuple[str, ...]]:
        ids = self.participants
        if self.num_neighbours == len(ids) - 1:
            return {cid: tuple(x for x in ids if x != cid) for cid in ids}
        # SecAgg+'s Harary graph: a ring shuffled by the public seed, each client linked to
        # num_neighbours / 2 clients on each side. Both ends compute it, so a client can check
        # the neighbours the coordinator names.
        ring = _shuffled(ids, self.round_seed)
        half = self.num_neighbours // 2
        n = len(ring)
        out: dict[str, tuple[str, ...]] = {}
        for pos, cid in enumerate(ring):
            near = {ring[(pos + d) % n] for d in range(-half, half + 1) if d}
            out[cid] = tuple(sorted(near))
        return out


def _modulus_bits(num_clients: int, quantization_bits: int) -> int:
    """The rule of :attr:`flctl.tensors.Quantizer.modulus_bits` (the two are tested equal)."""
    return 32 if num_clients * (2**quantization_bits - 1) < 2**32 else 64


def _shuffled(ids: Sequence[str], seed: bytes) -> list[str]:
    """Fisher-Yates with SHA-256 in counter mode: the same order on every machine and Python."""
    counter = 0

    def below(bound: int) -> int:
        nonlocal counter
        limit = 2**64 - 2**64 % bound
        while True:
            block = hashlib.sha256(_GRAPH_INFO + seed + struct.pack(">Q", counter)).digest()
            counter += 1
            value = int.from_bytes(block[:8], "big")
            if value < limit:
                return value % bound

    out = list(ids)
    for i in range(len(out) - 1, 0, -1):
        j = below(i + 1)
        out[i], out[j] = out[j], out[i]
    return out


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 1, client to coordinator: a client's two public keys for the round.

    Attributes:
        client_id: Who advertises.
        encryption_key: Raw X25519 public key for encrypting shares (``c_pk``).
        mask_key: Raw X25519 public key for pairwise masks (``s_pk``).
    """

    client_id: str
    encryption_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class ShareKeysRequest:
    """Stage 2, coordinator to client: the advertisements of the client's live neighbours.

    Attributes:
        advertisements: One per neighbour that advertised keys (the client's own may be
            included; it is checked against what the client sent).
    """

    advertisements: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True)
class ShareKeysReply:
    """Stage 2, client to coordinator: the client's shares, encrypted one per neighbour.

    Attributes:
        client_id: Whose shares.
        shares: One per neighbour in the request, each addressed to that neighbour.
    """

    client_id: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInputRequest:
    """Stage 3, coordinator to client: who shared keys, and the shares sent to this client.

    Attributes:
        key_sharers: Every client whose shares the coordinator accepted (sorted): the client
            masks against those of them that are its neighbours.
        shares: The encrypted shares addressed to this client.
    """

    key_sharers: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, coordinator to client: whose masked inputs arrived.

    Attributes:
        survivors: The clients whose masked input is in the sum (sorted). Every other client
            that shared keys counts as dropped.
    """

    survivors: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskReply:
    """Stage 4, client to coordinator: the shares that let the coordinator unmask the sum.

    A client never answers with both kinds of share of the same client.

    Attributes:
        client_id: Who answers.
        self_mask_shares: Survivor id to the wire form of its self-mask seed's share.
        mask_key_shares: Dropped client id to the wire form of its mask key's share.
    """

    client_id: str
    self_mask_shares: Mapping[str, bytes] = field(default_factory=dict)
    mask_key_shares: Mapping[str, bytes] = field(default_factory=dict)
