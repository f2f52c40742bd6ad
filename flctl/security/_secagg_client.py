"""The client side of a SecAgg+ round: a state machine with one method per stage.

A client's secrets for one round: an encryption key pair ``c``, a mask key pair ``s`` and a
self-mask seed ``b``. It shares ``s_sk`` and ``b`` (Shamir, ``t`` of its holders: itself and its
neighbours), masks its quantized update with ``PRG(b)`` plus ``+PRG(s_ij)`` for each neighbour
``j`` after it in the participants' order and ``-PRG(s_ij)`` for each one before it, and at
unmasking reveals, for each client it holds shares of, the share of ``b`` if that client's
input arrived or the share of ``s_sk`` if it dropped, never both, and only once.

Any protocol violation by the coordinator raises :class:`~flctl.core.errors.SecAggError` and
ends the client's part in the round; later calls are refused.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

from numpy.typing import NDArray

from flctl.core.errors import SecAggError, SecAggThresholdError, ShareRefusedError
from flctl.security._masking import MaskTerm, apply_mask_terms
from flctl.security._secagg import (
    EncryptedShare,
    X25519KeyPair,
    check_public_key,
    decrypt_share,
    derive_mask_seed,
    derive_share_key,
    encrypt_share,
)
from flctl.security._secagg_messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    SecAggSetup,
    SecAggStage,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from flctl.security._shamir import ShamirShare, split_secret

__all__ = ["SecAggClient"]

_SECRET_BYTES = 32


class SecAggClient:
    """One client's part in one SecAgg+ round.

    Args:
        setup: The round's setup, as the coordinator sent it.
        client_id: This client's id; must be one of ``setup.participants``.
        random_bytes: Where keys, seeds, share coefficients and nonces come from; the
            operating system's CSPRNG when omitted. Only tests pass one.

    Raises:
        SecAggError: ``client_id`` is not a participant of the round.

    Example:
        The engine calls, in order::

            ad = client.advertise_keys()                       # stage 1, to the coordinator
            reply = client.share_keys(share_keys_request)      # stage 2
            client.receive_shares(masked_input_request)        # stage 3
            for offset, chunk in quantized_chunks:             # stage 3, chunk by chunk
                upload(client.mask(chunk, offset))
            answer = client.unmask(unmask_request)             # stage 4
    """

    def __init__(
        self,
        setup: SecAggSetup,
        client_id: str,
        *,
        random_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        if client_id not in setup.participants:
            raise SecAggError(
                f"client {client_id!r} is not a participant of round {setup.server_round}'s "
                "secure aggregation"
            )
        self._setup = setup
        self._id = client_id
        self._random = random_bytes or os.urandom
        self._stage = SecAggStage.ADVERTISE_KEYS
        self._failed: str | None = None
        self._enc: X25519KeyPair | None = None
        self._mask_keys: X25519KeyPair | None = None
        self._self_seed = b""
        self._peers: dict[str, KeyAdvertisement] = {}
        # owner -> (share of its mask key, share of its self-mask seed), wire forms
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._sharers: frozenset[str] = frozenset()
        self._terms: list[MaskTerm] | None = None
        self._refused: dict[str, str] = {}

    @property
    def client_id(self) -> str:
        """This client's id."""
        return self._id

    @property
    def stage(self) -> SecAggStage:
        """The stage whose request this client waits for (``DONE`` once it has answered all)."""
        return self._stage

    @property
    def refused_shares(self) -> dict[str, str]:
        """Senders whose share this client refused in stage 3, with the reason."""
        return dict(self._refused)

    def advertise_keys(self) -> KeyAdvertisement:
        """Stage 1: make this round's keys and self-mask seed; return the public keys.

        Raises:
            SecAggError: Called out of order.
        """
        self._expect(SecAggStage.ADVERTISE_KEYS)
        self._enc = X25519KeyPair.generate(self._random)
        self._mask_keys = X25519KeyPair.generate(self._random)
        self._self_seed = self._random(_SECRET_BYTES)
        self._stage = SecAggStage.SHARE_KEYS
        return KeyAdvertisement(self._id, self._enc.public_key, self._mask_keys.public_key)

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Stage 2: share ``s_sk`` and ``b`` with the live neighbours, each share encrypted.

        Args:
            request: The neighbours' advertisements, relayed by the coordinator.

        Returns:
            One encrypted share per neighbour in the request.

        Raises:
            SecAggError: A relayed key is not a neighbour's, repeats, is malformed, or this
                client's own keys were altered; called out of order.
            SecAggThresholdError: Fewer than ``t`` holders (this client and its live
                neighbours) remain.
        """
        self._expect(SecAggStage.SHARE_KEYS)
        with self._failing():
            return self._share_keys(request)

    def _share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        assert self._enc is not None and self._mask_keys is not None
        setup = self._setup
        neighbours = set(setup.neighbours(self._id))
        own = KeyAdvertisement(self._id, self._enc.public_key, self._mask_keys.public_key)
        peers: dict[str, KeyAdvertisement] = {}
        for ad in request.advertisements:
            if ad.client_id == self._id:
                if ad != own:
                    raise SecAggError("the coordinator relayed other keys under this client's id")
                continue
            if ad.client_id not in neighbours:
                raise SecAggError(
                    f"the coordinator relayed keys of {ad.client_id!r}, not a neighbour"
                )
            if ad.client_id in peers:
                raise SecAggError(f"the coordinator relayed {ad.client_id!r}'s keys twice")
            check_public_key(ad.encryption_key)
            check_public_key(ad.mask_key)
            peers[ad.client_id] = ad
        keys = [own.encryption_key, own.mask_key]
        for ad in peers.values():
            keys += [ad.encryption_key, ad.mask_key]
        if len(set(keys)) != len(keys):
            # Bell et al.: distinct keys, so the coordinator cannot hand a client its own keys.
            raise SecAggError("the relayed public keys are not all distinct")
        holders = sorted([self._id, *peers])
        if len(holders) < setup.threshold:
            raise SecAggThresholdError(
                f"only {len(holders)} of this client's share holders advertised keys; "
                f"the threshold is {setup.threshold}"
            )
        indices = [setup.index(h) for h in holders]
        key_shares = split_secret(
            self._mask_keys.private_bytes(), setup.threshold, indices, random_bytes=self._random
        )
        seed_shares = split_secret(
            self._self_seed, setup.threshold, indices, random_bytes=self._random
        )
        out: list[EncryptedShare] = []
        for holder, key_share, seed_share in zip(holders, key_shares, seed_shares, strict=True):
            if holder == self._id:
                self._held[holder] = (key_share.to_bytes(), seed_share.to_bytes())
                continue
            shared = self._enc.exchange(peers[holder].encryption_key)
            out.append(
                encrypt_share(
                    derive_share_key(shared, setup.round_seed),
                    _pack(key_share.to_bytes(), seed_share.to_bytes()),
                    server_round=setup.server_round,
                    round_seed=setup.round_seed,
                    sender=self._id,
                    receiver=holder,
                    random_bytes=self._random,
                )
            )
        self._peers = peers
        self._stage = SecAggStage.MASKED_INPUT
        return ShareKeysReply(self._id, tuple(out))

    def receive_shares(self, request: MaskedInputRequest) -> None:
        """Stage 3: keep the shares addressed to this client and derive the mask terms.

        A share that fails authentication, is malformed or comes from a client that is not a
        key-sharing neighbour is refused (:attr:`refused_shares`) and the round goes on.

        Args:
            request: Who shared keys, and the shares sent to this client.

        Raises:
            SecAggError: The list of key sharers leaves this client out, names strangers or a
                neighbour whose keys never came; called out of order or twice.
            SecAggThresholdError: Fewer than ``t`` of this client's holders shared keys.
        """
        self._expect(SecAggStage.MASKED_INPUT)
        if self._terms is not None:
            raise SecAggError("the shares of this round were already received")
        with self._failing():
            self._receive_shares(request)

    def _receive_shares(self, request: MaskedInputRequest) -> None:
        assert self._enc is not None and self._mask_keys is not None
        setup = self._setup
        sharers = frozenset(request.key_sharers)
        if self._id not in sharers:
            raise SecAggError("the coordinator's list of key sharers leaves this client out")
        strangers = sharers - set(setup.participants)
        if strangers:
            raise SecAggError(f"the list of key sharers names non-participants {sorted(strangers)}")
        live = sorted(sharers & set(setup.neighbours(self._id)))
        missing = [j for j in live if j not in self._peers]
        if missing:
            raise SecAggError(f"neighbours {missing} shared keys but their keys never came")
        if len(live) + 1 < setup.threshold:
            raise SecAggThresholdError(
                f"only {len(live) + 1} of this client's share holders shared keys; "
                f"the threshold is {setup.threshold}"
            )
        for share in request.shares:
            try:
                self._accept_share(share, live)
            except ShareRefusedError as exc:
                self._refused[share.sender] = exc.message
        me = setup.index(self._id)
        terms: list[MaskTerm] = [(self._self_seed, 1)]
        for j in live:
            shared = self._mask_keys.exchange(self._peers[j].mask_key)
            terms.append(
                (derive_mask_seed(shared, setup.round_seed), 1 if me < setup.index(j) else -1)
            )
        self._terms = terms
        self._sharers = sharers
        # The mask key's job is done (its shares are out); do not keep it longer than needed.
        self._mask_keys = None

    def _accept_share(self, share: EncryptedShare, live: list[str]) -> None:
        assert self._enc is not None
        setup = self._setup
        if share.sender not in live:
            raise ShareRefusedError(f"share from {share.sender!r}, not a key-sharing neighbour")
        if share.sender in self._held or share.sender in self._refused:
            raise ShareRefusedError(f"a second share from {share.sender!r}")
        shared = self._enc.exchange(self._peers[share.sender].encryption_key)
        plaintext = decrypt_share(
            derive_share_key(shared, setup.round_seed),
            share,
            server_round=setup.server_round,
            round_seed=setup.round_seed,
            receiver=self._id,
        )
        key_share, seed_share = _unpack(plaintext, share.sender)
        for parsed in (ShamirShare.from_bytes(key_share), ShamirShare.from_bytes(seed_share)):
            expected = (setup.index(self._id), setup.threshold, _SECRET_BYTES)
            if (parsed.index, parsed.threshold, parsed.secret_length) != expected:
                raise ShareRefusedError(
                    f"share from {share.sender!r} is for another holder, threshold or secret"
                )
        self._held[share.sender] = (key_share, seed_share)

    def mask(self, values: NDArray[Any], offset: int) -> NDArray[Any]:
        """Stage 3: mask one chunk of the quantized update.

        Args:
            values: Elements ``[offset, offset + len(values))`` of the flat quantized update,
                as ``uint32`` or ``uint64`` after ``setup.modulus_bits``.
            offset: The chunk's position in the flat update.

        Returns:
            The masked chunk (a new array): what the client uploads.

        Raises:
            SecAggError: Called before :meth:`receive_shares` or after :meth:`unmask`.
            ValueError: The chunk lies outside the update.
            TypeError: The chunk has the wrong dtype.
        """
        self._expect(SecAggStage.MASKED_INPUT)
        if self._terms is None:
            raise SecAggError("masking needs the stage-3 shares first (receive_shares)")
        if offset < 0 or offset + len(values) > self._setup.num_elements:
            raise ValueError(
                f"elements [{offset}, {offset + len(values)}) lie outside the update of "
                f"{self._setup.num_elements}"
            )
        return apply_mask_terms(values, offset, self._terms, self._setup.modulus_bits)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage 4: reveal shares of survivors' self-mask seeds and of dropped clients' keys.

        Answers once per round: a second request could ask for the other share of a client
        named a survivor the first time, and both together reveal its update.

        Args:
            request: Whose masked inputs arrived.

        Returns:
            The shares this client holds, one kind per client.

        Raises:
            SecAggError: The survivors include clients that never shared keys or leave this
                client out; called out of order or a second time.
            SecAggThresholdError: Fewer than ``t`` of this client's holders survived.
        """
        if self._stage is SecAggStage.DONE and self._failed is None:
            raise SecAggError(
                f"already answered round {self._setup.server_round}'s unmasking request; "
                "answering twice could reveal both shares of one client"
            )
        self._expect(SecAggStage.MASKED_INPUT)
        if self._terms is None:
            raise SecAggError("unmasking needs the stage-3 shares first (receive_shares)")
        with self._failing():
            return self._unmask(request)

    def _unmask(self, request: UnmaskRequest) -> UnmaskReply:
        setup = self._setup
        survivors = frozenset(request.survivors)
        strangers = survivors - self._sharers
        if strangers:
            raise SecAggError(f"survivors {sorted(strangers)} never shared keys")
        if self._id not in survivors:
            raise SecAggError("the coordinator's survivors leave this client out")
        holders = survivors & set(setup.holders(self._id))
        if len(holders) < setup.threshold:
            raise SecAggThresholdError(
                f"only {len(holders)} of this client's share holders survived; "
                f"the threshold is {setup.threshold}"
            )
        # Decide the state first: whatever happens next, this client never answers again.
        self._stage = SecAggStage.DONE
        dropped = self._sharers - survivors
        seeds = {o: shares[1] for o, shares in self._held.items() if o in survivors}
        keys = {o: shares[0] for o, shares in self._held.items() if o in dropped}
        assert not seeds.keys() & keys.keys()
        self._held.clear()
        return UnmaskReply(self._id, seeds, keys)

    def _expect(self, stage: SecAggStage) -> None:
        if self._failed is not None:
            raise SecAggError(f"this client's secure aggregation already failed: {self._failed}")
        if self._stage is not stage:
            raise SecAggError(f"a {stage.value} request came while waiting for {self._stage.value}")

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Mark the client failed when a stage raises, so a coordinator cannot retry it."""
        try:
            yield
        except Exception as exc:
            self._failed = exc.message if isinstance(exc, SecAggError) else str(exc)
            self._stage = SecAggStage.DONE
            raise


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def _unpack(data: bytes, sender: str) -> tuple[bytes, bytes]:
    parts: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            break
        (size,) = struct.unpack_from(">H", data, pos)
        parts.append(data[pos + 2 : pos + 2 + size])
        pos += 2 + size
    if pos != len(data) or len(parts) != 2:
        raise ShareRefusedError(f"share from {sender!r} is malformed")
    return parts[0], parts[1]
