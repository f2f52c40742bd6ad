"""The coordinator side of a SecAgg+ round: a state machine that relays, checks and unmasks.

The coordinator never sees a key it could decrypt a share with, nor an unmasked update. It
collects each stage's messages (``receive_*``), closes the stage when the engine decides
(``*_requests``: every participant that has not answered by then has dropped), and at the end
reconstructs what it needs to remove the masks from the sum (:meth:`SecAggServer.finish`):

- for each survivor ``i`` (its masked input is in the sum): ``b_i`` from ``t`` shares, and the
  term ``-PRG(b_i)``;
- for each client ``d`` that shared keys but whose input never came: ``s_sk_d`` from ``t``
  shares (checked against the public key ``d`` advertised), and for each survivor ``i`` among
  its neighbours the opposite of the pairwise mask ``i`` added.

A message that breaks the protocol is refused with :class:`~flctl.core.errors.SecAggError`
(its reason is kept in :attr:`SecAggServer.refusals`) and its sender counts as dropped at that
stage; the round goes on as long as every secret it needs keeps ``t`` live holders, and fails
with :class:`~flctl.core.errors.SecAggThresholdError` otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from flctl.core.errors import SecAggError, SecAggThresholdError, ShareRefusedError
from flctl.security._masking import MaskTerm, apply_mask_terms
from flctl.security._secagg import (
    EncryptedShare,
    X25519KeyPair,
    check_public_key,
    derive_mask_seed,
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
from flctl.security._shamir import ShamirShare, recover_secret

__all__ = ["SecAggResult", "SecAggServer"]

_SECRET_BYTES = 32
# Two 32-byte secrets' shares (55 bytes each), their length prefixes, nonce and tag: ~140 bytes.
_MAX_CIPHERTEXT_BYTES = 1024


@dataclass(frozen=True)
class SecAggResult:
    """What an unmasked round gives the coordinator: how to turn the masked sum into the sum.

    Attributes:
        server_round: The round's number.
        survivors: The clients whose masked inputs are in the sum (sorted).
        dropouts: Each client that left the protocol, with the stage it did not answer.
        refusals: Each client whose message was refused, with the reason.
        modulus_bits: 32 or 64, as in the setup.
        num_elements: The update vector's length.
        mask_terms: The ``(seed, sign)`` terms that remove what is left of the masks.
    """

    server_round: int
    survivors: tuple[str, ...]
    dropouts: Mapping[str, SecAggStage]
    refusals: Mapping[str, str]
    modulus_bits: int
    num_elements: int
    mask_terms: tuple[MaskTerm, ...] = field(repr=False)

    @property
    def num_inputs(self) -> int:
        """How many updates the sum holds (divide by it, or pass it to dequantization)."""
        return len(self.survivors)

    def unmask(self, masked_sum: NDArray[Any], offset: int) -> NDArray[Any]:
        """Remove the masks from one chunk of the modular sum of the survivors' masked inputs.

        Args:
            masked_sum: Elements ``[offset, offset + len(masked_sum))`` of the sum, modulo
                ``2**modulus_bits`` (numpy's unsigned addition wraps exactly so).
            offset: The chunk's position in the flat vector.

        Returns:
            The sum of the survivors' quantized updates for that chunk (a new array);
            :meth:`flctl.tensors.Quantizer.dequantize_sum` turns it into floats.

        Raises:
            ValueError: The chunk lies outside the vector.
            TypeError: The chunk has the wrong dtype.
        """
        if offset < 0 or offset + len(masked_sum) > self.num_elements:
            raise ValueError(
                f"elements [{offset}, {offset + len(masked_sum)}) lie outside the update of "
                f"{self.num_elements}"
            )
        return apply_mask_terms(masked_sum, offset, self.mask_terms, self.modulus_bits)


class SecAggServer:
    """The coordinator's part in one SecAgg+ round.

    Args:
        setup: The round's setup, the one sent to every participant.

    Example:
        The engine calls, in order, closing each stage at its deadline::

            server.receive_keys(ad)                            # for each KeyAdvertisement
            requests = server.share_keys_requests()            # id -> ShareKeysRequest
            server.receive_shares(reply)                       # for each ShareKeysReply
            requests = server.masked_input_requests()          # id -> MaskedInputRequest
            server.receive_masked_input(cid, num_elements)     # once a masked upload is whole
            requests = server.unmask_requests()                # id -> UnmaskRequest
            server.receive_unmask(reply)                       # for each UnmaskReply
            result = server.finish()
            total = result.unmask(masked_sum_chunk, offset)    # chunk by chunk
    """

    def __init__(self, setup: SecAggSetup) -> None:
        self._setup = setup
        self._stage = SecAggStage.ADVERTISE_KEYS
        self._ads: dict[str, KeyAdvertisement] = {}
        self._shares: dict[str, tuple[EncryptedShare, ...]] = {}
        self._uploaded: set[str] = set()
        self._replies: dict[str, tuple[dict[str, ShamirShare], dict[str, ShamirShare]]] = {}
        self._raw_replies: dict[str, UnmaskReply] = {}
        self._live: tuple[str, ...] = setup.participants
        self._advertised: tuple[str, ...] = ()
        self._sharers: tuple[str, ...] = ()
        self._survivors: tuple[str, ...] = ()
        self._dropouts: dict[str, SecAggStage] = {}
        self._refusals: dict[str, str] = {}

    @property
    def setup(self) -> SecAggSetup:
        """The round's setup."""
        return self._setup

    @property
    def stage(self) -> SecAggStage:
        """The stage whose messages the server collects (``DONE`` after :meth:`finish`)."""
        return self._stage

    @property
    def waiting_for(self) -> tuple[str, ...]:
        """The live clients whose message for the current stage has not come yet."""
        answered: dict[SecAggStage, Iterable[str]] = {
            SecAggStage.ADVERTISE_KEYS: self._ads,
            SecAggStage.SHARE_KEYS: self._shares,
            SecAggStage.MASKED_INPUT: self._uploaded,
            SecAggStage.UNMASK: self._replies,
        }
        done = set(answered.get(self._stage, self._live))
        return tuple(c for c in self._live if c not in done)

    @property
    def dropouts(self) -> dict[str, SecAggStage]:
        """Each client that left, with the stage it did not answer (or was refused at)."""
        return dict(self._dropouts)

    @property
    def refusals(self) -> dict[str, str]:
        """Each client whose message was refused, with the reason."""
        return dict(self._refusals)

    # -- stage 1 ---------------------------------------------------------------------------

    def receive_keys(self, advertisement: KeyAdvertisement) -> None:
        """Stage 1: accept a client's public keys.

        Raises:
            SecAggError: Out of stage, not a participant, a second advertisement that differs
                from the first (the same one again is a retry and accepted), a malformed key,
                or a key another client already advertised.
        """
        cid = advertisement.client_id
        self._expect(SecAggStage.ADVERTISE_KEYS, cid)
        if self._ads.get(cid) == advertisement:
            return
        with self._refusing(cid):
            if cid in self._ads:
                raise SecAggError(f"{cid!r} advertised other keys a second time")
            check_public_key(advertisement.encryption_key)
            check_public_key(advertisement.mask_key)
            keys = {advertisement.encryption_key, advertisement.mask_key}
            taken = {k for ad in self._ads.values() for k in (ad.encryption_key, ad.mask_key)}
            if len(keys) != 2 or keys & taken:
                raise SecAggError(f"{cid!r} advertised a public key that is not fresh")
            self._ads[cid] = advertisement

    def share_keys_requests(self) -> dict[str, ShareKeysRequest]:
        """Close stage 1; return each live client's neighbours' keys.

        Raises:
            SecAggError: Out of stage.
            SecAggThresholdError: No client has ``t`` live share holders.
        """
        self._expect(SecAggStage.ADVERTISE_KEYS)
        self._close(set(self._ads), SecAggStage.ADVERTISE_KEYS)
        self._advertised = self._live
        live = set(self._live)
        self._stage = SecAggStage.SHARE_KEYS
        return {
            cid: ShareKeysRequest(
                tuple(self._ads[j] for j in self._setup.neighbours(cid) if j in live)
            )
            for cid in self._live
        }

    # -- stage 2 ---------------------------------------------------------------------------

    def receive_shares(self, reply: ShareKeysReply) -> None:
        """Stage 2: accept a client's encrypted shares, one per live neighbour.

        Raises:
            SecAggError: Out of stage, not a live client, a second reply that differs from the
                first (the same one again is accepted), or shares that are not exactly one for
                each live neighbour, all from this client.
        """
        cid = reply.client_id
        self._expect(SecAggStage.SHARE_KEYS, cid)
        if self._shares.get(cid) == tuple(reply.shares):
            return
        with self._refusing(cid):
            if cid in self._shares:
                raise SecAggError(f"{cid!r} sent other shares a second time")
            live = set(self._live)
            expected = {j for j in self._setup.neighbours(cid) if j in live}
            receivers = [s.receiver for s in reply.shares]
            if any(s.sender != cid for s in reply.shares):
                raise SecAggError(f"{cid!r} sent shares in another client's name")
            if len(set(receivers)) != len(receivers) or set(receivers) != expected:
                raise SecAggError(
                    f"{cid!r} must send one share to each of {sorted(expected)}, "
                    f"sent {sorted(receivers)}"
                )
            if any(len(s.ciphertext) > _MAX_CIPHERTEXT_BYTES for s in reply.shares):
                raise SecAggError(f"{cid!r} sent a share of over {_MAX_CIPHERTEXT_BYTES} bytes")
            self._shares[cid] = tuple(reply.shares)

    def masked_input_requests(self) -> dict[str, MaskedInputRequest]:
        """Close stage 2; return, per client that shared keys, the list and its shares.

        Raises:
            SecAggError: Out of stage.
            SecAggThresholdError: No client has ``t`` live share holders.
        """
        self._expect(SecAggStage.SHARE_KEYS)
        self._close(set(self._shares), SecAggStage.SHARE_KEYS)
        self._sharers = self._live
        self._stage = SecAggStage.MASKED_INPUT
        inbox: dict[str, list[EncryptedShare]] = {cid: [] for cid in self._live}
        for sender in self._live:
            for share in self._shares[sender]:
                if share.receiver in inbox:
                    inbox[share.receiver].append(share)
        return {cid: MaskedInputRequest(self._sharers, tuple(inbox[cid])) for cid in self._live}

    # -- stage 3 ---------------------------------------------------------------------------

    def receive_masked_input(self, client_id: str, num_elements: int) -> None:
        """Stage 3: record that a client's masked input arrived whole (the engine sums it).

        Args:
            client_id: Whose masked input.
            num_elements: How many elements it holds.

        Raises:
            SecAggError: Out of stage, not a client that shared keys, a second input, or an
                input of the wrong length: the engine must leave it out of the sum. (A second
                input leaves the first one in the sum, and its sender in the round.)
        """
        self._expect(SecAggStage.MASKED_INPUT, client_id)
        if client_id in self._uploaded:
            raise SecAggError(f"{client_id!r} sent its masked input twice: the first one counts")
        with self._refusing(client_id):
            if num_elements != self._setup.num_elements:
                raise SecAggError(
                    f"{client_id!r} sent a masked input of {num_elements} elements, "
                    f"not {self._setup.num_elements}"
                )
            self._uploaded.add(client_id)

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """Close stage 3; ask every survivor for its shares.

        Raises:
            SecAggError: Out of stage.
            SecAggThresholdError: Some secret the unmasking needs has fewer than ``t``
                surviving holders, or no input arrived.
        """
        self._expect(SecAggStage.MASKED_INPUT)
        survivors = [c for c in self._sharers if c in self._uploaded]
        for cid in self._sharers:
            if cid not in self._uploaded:
                self._dropouts[cid] = SecAggStage.MASKED_INPUT
        self._survivors = self._live = tuple(survivors)
        if not survivors:
            self._stage = SecAggStage.DONE
            raise SecAggThresholdError(f"round {self._setup.server_round}: no masked input arrived")
        alive = set(survivors)
        for owner in self._needed_secrets():
            holders = alive & set(self._setup.holders(owner))
            if len(holders) < self._setup.threshold:
                self._stage = SecAggStage.DONE
                raise SecAggThresholdError(self._short_of(owner, len(holders), "survived"))
        self._stage = SecAggStage.UNMASK
        request = UnmaskRequest(self._survivors)
        return dict.fromkeys(self._survivors, request)

    # -- stage 4 ---------------------------------------------------------------------------

    def receive_unmask(self, reply: UnmaskReply) -> None:
        """Stage 4: accept a survivor's shares.

        Raises:
            SecAggError: Out of stage, not a survivor, a second reply that differs from the
                first (the same one again is accepted), a share of the wrong kind for its owner
                (a survivor's key, a dropped client's seed) or of a client it does not hold
                shares of.
            ShareRefusedError: A share is malformed or not this holder's.
        """
        cid = reply.client_id
        self._expect(SecAggStage.UNMASK, cid)
        if self._raw_replies.get(cid) == reply:
            return
        with self._refusing(cid):
            if cid in self._replies:
                raise SecAggError(f"{cid!r} sent other unmasking shares a second time")
            survivors = set(self._survivors)
            dropped = set(self._sharers) - survivors
            seeds = self._parse(cid, reply.self_mask_shares, survivors, "self-mask seed")
            keys = self._parse(cid, reply.mask_key_shares, dropped, "mask key")
            self._replies[cid] = (seeds, keys)
            self._raw_replies[cid] = reply

    def finish(self) -> SecAggResult:
        """Close stage 4: reconstruct the secrets and return how to unmask the sum.

        Raises:
            SecAggError: Out of stage.
            SecAggThresholdError: Fewer than ``t`` shares of some needed secret arrived.
            ShareRefusedError: Shares disagree, or a rebuilt key is not the advertised one.
        """
        self._expect(SecAggStage.UNMASK)
        self._stage = SecAggStage.DONE
        for cid in self._survivors:
            if cid not in self._replies:
                self._dropouts[cid] = SecAggStage.UNMASK
        setup = self._setup
        survivors = set(self._survivors)
        terms: list[MaskTerm] = []
        for owner in self._survivors:
            seed = self._recover(owner, 0, "self-mask seed")
            terms.append((seed, -1))
        for owner in self._needed_secrets():
            if owner in survivors:
                continue
            key = X25519KeyPair(self._recover(owner, 1, "mask key"))
            if key.public_key != self._ads[owner].mask_key:
                raise ShareRefusedError(
                    f"the shares of {owner!r}'s mask key do not rebuild the key it advertised"
                )
            for i in setup.neighbours(owner):
                if i in survivors:
                    shared = key.exchange(self._ads[i].mask_key)
                    sign = 1 if setup.index(i) < setup.index(owner) else -1
                    # i added sign * PRG(s_i,owner); nobody's mask cancels it, so take it out.
                    terms.append((derive_mask_seed(shared, setup.round_seed), -sign))
        return SecAggResult(
            server_round=setup.server_round,
            survivors=self._survivors,
            dropouts=dict(self._dropouts),
            refusals=dict(self._refusals),
            modulus_bits=setup.modulus_bits,
            num_elements=setup.num_elements,
            mask_terms=tuple(terms),
        )

    # -- helpers ---------------------------------------------------------------------------

    def _needed_secrets(self) -> list[str]:
        """Return whose secret the unmasking needs.

        Every survivor's seed, and the key of each dropped client with a surviving neighbour.
        """
        survivors = set(self._survivors)
        out = list(self._survivors)
        for cid in self._sharers:
            if cid not in survivors and survivors & set(self._setup.neighbours(cid)):
                out.append(cid)
        return out

    def _recover(self, owner: str, kind: int, what: str) -> bytes:
        shares = [
            self._replies[h][kind][owner]
            for h in self._setup.holders(owner)
            if h in self._replies and owner in self._replies[h][kind]
        ]
        if len(shares) < self._setup.threshold:
            raise SecAggThresholdError(self._short_of(owner, len(shares), f"sent its {what}"))
        try:
            return recover_secret(shares)
        except ShareRefusedError as exc:
            raise ShareRefusedError(f"the shares of {owner!r}'s {what}: {exc.message}") from exc

    def _short_of(self, owner: str, have: int, verb: str) -> str:
        return (
            f"round {self._setup.server_round} cannot be unmasked: only {have} of "
            f"{owner!r}'s share holders {verb}, the threshold is {self._setup.threshold} "
            f"(dropped: {', '.join(sorted(self._dropouts)) or 'none'})"
        )

    def _parse(
        self, holder: str, shares: Mapping[str, bytes], allowed: set[str], what: str
    ) -> dict[str, ShamirShare]:
        setup = self._setup
        out: dict[str, ShamirShare] = {}
        for owner, data in shares.items():
            if owner not in allowed or holder not in setup.holders(owner):
                raise SecAggError(f"{holder!r} sent a {what} share of {owner!r} it may not send")
            share = ShamirShare.from_bytes(data)
            if (share.index, share.threshold, share.secret_length) != (
                setup.index(holder),
                setup.threshold,
                _SECRET_BYTES,
            ):
                raise ShareRefusedError(f"{holder!r}'s {what} share of {owner!r} is not its own")
            out[owner] = share
        return out

    def _close(self, answered: set[str], stage: SecAggStage) -> None:
        """Drop the clients that did not answer, then those short of live share holders.

        A client left with fewer than ``t`` live holders could not have its secrets recovered;
        dropping it can leave others short, so this repeats until none is.
        """
        live = {c for c in self._live if c in answered and c not in self._refusals}
        for cid in self._live:
            if cid not in live:
                self._dropouts[cid] = stage
        t = self._setup.threshold
        while True:
            short = {c for c in live if len(live & set(self._setup.holders(c))) < t}
            if not short:
                break
            for cid in short:
                self._dropouts[cid] = stage
                self._refusals.setdefault(cid, f"fewer than {t} of its share holders are live")
            live -= short
        self._live = tuple(c for c in self._setup.participants if c in live)
        if not live:
            self._stage = SecAggStage.DONE
            raise SecAggThresholdError(
                f"round {self._setup.server_round} cannot go on with secure aggregation: "
                f"after {stage.value}, no client keeps {t} live share holders "
                f"(dropped: {', '.join(sorted(self._dropouts)) or 'none'})"
            )

    def _expect(self, stage: SecAggStage, client_id: str | None = None) -> None:
        if self._stage is not stage:
            raise SecAggError(f"a {stage.value} step came while at {self._stage.value}")
        if client_id is not None and client_id not in self._live:
            raise SecAggError(f"{client_id!r} is not a live client of this SecAgg round")
        if client_id is not None and client_id in self._refusals:
            raise SecAggError(f"{client_id!r} was refused earlier in this SecAgg round")

    @contextlib.contextmanager
    def _refusing(self, client_id: str) -> Iterator[None]:
        """Record a refused message's reason under its sender (who is then out of the round)."""
        try:
            yield
        except SecAggError as exc:
            self._refusals[client_id] = exc.message
            raise
