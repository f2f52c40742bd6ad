"""SecAgg key agreement and share encryption: X25519, HKDF-SHA256 and ChaCha20-Poly1305.

Every primitive comes from ``cryptography``; nothing here is home-made:

- Key agreement: X25519 (RFC 7748). Each client makes two key pairs per round, one for
  encrypting shares and one for pairwise masks. A public key of low order (one that makes every
  shared secret zero) is refused.
- Key derivation: HKDF-SHA256 (RFC 5869) of the X25519 shared secret, salted with the round's
  public seed, with ``info`` naming the purpose (``flctl-secagg-v1 share`` or
  ``flctl-secagg-v1 mask``), so the share key and the mask seed of one pair are unrelated.
- Authenticated encryption: ChaCha20-Poly1305 (RFC 8439) with a random 96-bit nonce sent in
  front of the ciphertext. The associated data binds the round (its seed and number), the
  sender and the receiver, so a share cannot be replayed in another round, reflected back to
  its sender, or passed to another client: any of these, or a flipped bit, fails
  authentication and is refused with :class:`~flctl.core.errors.ShareRefusedError`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flctl.core.errors import SecAggError, ShareRefusedError

__all__ = [
    "EncryptedShare",
    "X25519KeyPair",
    "check_public_key",
    "decrypt_share",
    "derive_mask_seed",
    "derive_share_key",
    "encrypt_share",
]

_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SHARE_INFO = b"flctl-secagg-v1 share"
_MASK_INFO = b"flctl-secagg-v1 mask"
_AD_PREFIX = b"flctl-secagg-v1 share-ad\x00"
# Any fixed scalar will do: X25519 clamps every scalar to a multiple of the cofactor, so a
# low-order point yields the all-zero secret whatever the private key.
_PROBE_KEY = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


@dataclass(frozen=True)
class EncryptedShare:
    """One client's shares for one neighbour, encrypted for that neighbour alone.

    The coordinator relays it without being able to read it.

    Attributes:
        sender: The client whose secrets the shares are of.
        receiver: The client who may decrypt them.
        ciphertext: The 12-byte nonce followed by the ChaCha20-Poly1305 ciphertext and tag.
    """

    sender: str
    receiver: str
    ciphertext: bytes


class X25519KeyPair:
    """An X25519 private key and its public key, as raw 32-byte strings at the border.

    Args:
        private_key: The raw 32-byte private key.

    Raises:
        ValueError: ``private_key`` is not 32 bytes.
    """

    def __init__(self, private_key: bytes) -> None:
        if not isinstance(private_key, bytes) or len(private_key) != _KEY_BYTES:
            raise ValueError(f"an X25519 private key is {_KEY_BYTES} bytes")
        self._key = X25519PrivateKey.from_private_bytes(private_key)
        self._raw = private_key

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] | None = None) -> X25519KeyPair:
        """Make a fresh key pair.

        Args:
            random_bytes: Where the private key's 32 bytes come from; the operating system's
                CSPRNG when omitted. Only tests pass one.

        Returns:
            The key pair.
        """
        return cls((random_bytes or os.urandom)(_KEY_BYTES))

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def private_bytes(self) -> bytes:
        """Return the raw 32-byte private key (SecAgg shares it with Shamir's scheme)."""
        return self._raw

    def exchange(self, peer_public_key: bytes) -> bytes:
        """Return the X25519 shared secret with a peer.

        Args:
            peer_public_key: The peer's raw 32-byte public key.

        Returns:
            The 32-byte shared secret (feed it to HKDF, never use it as a key directly).

        Raises:
            SecAggError: The public key is malformed or of low order.
        """
        check_public_key(peer_public_key)
        return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))

    def __repr__(self) -> str:
        return f"X25519KeyPair(public_key={self.public_key.hex()[:16]}...)"


def check_public_key(public_key: bytes) -> None:
    """Refuse a public key that is not 32 bytes or is of low order.

    Args:
        public_key: A raw X25519 public key, as a client advertised it.

    Raises:
        SecAggError: It is malformed, or every shared secret with it would be zero.
    """
    if not isinstance(public_key, bytes) or len(public_key) != _KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {_KEY_BYTES} bytes")
    try:
        _PROBE_KEY.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError as exc:
        raise SecAggError("refused an X25519 public key of low order") from exc


def _hkdf(shared_secret: bytes, round_seed: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=round_seed, info=info).derive(
        shared_secret
    )


def derive_share_key(shared_secret: bytes, round_seed: bytes) -> bytes:
    """Derive the ChaCha20-Poly1305 key of a pair of clients from their X25519 secret.

    Args:
        shared_secret: X25519 of one client's encryption key with the other's.
        round_seed: The round's public seed (HKDF's salt).

    Returns:
        A 32-byte AEAD key, the same on both sides.
    """
    return _hkdf(shared_secret, round_seed, _SHARE_INFO)


def derive_mask_seed(shared_secret: bytes, round_seed: bytes) -> bytes:
    """Derive the pairwise mask seed of a pair of clients from their X25519 secret.

    Args:
        shared_secret: X25519 of one client's mask key with the other's.
        round_seed: The round's public seed (HKDF's salt).

    Returns:
        A 32-byte seed for :func:`~flctl.security.mask_stream`, the same on both sides.
    """
    return _hkdf(shared_secret, round_seed, _MASK_INFO)


def _associated_data(round_seed: bytes, server_round: int, sender: str, receiver: str) -> bytes:
    parts = [_AD_PREFIX, round_seed, struct.pack(">Q", server_round)]
    for name in (sender, receiver):
        raw = name.encode()
        parts += [struct.pack(">H", len(raw)), raw]
    return b"".join(parts)


def encrypt_share(
    key: bytes,
    plaintext: bytes,
    *,
    server_round: int,
    round_seed: bytes,
    sender: str,
    receiver: str,
    random_bytes: Callable[[int], bytes] | None = None,
) -> EncryptedShare:
    """Encrypt ``plaintext`` from ``sender`` for ``receiver`` in one round.

    Args:
        key: The pair's key from :func:`derive_share_key`.
        plaintext: The shares (their wire form).
        server_round: The round's number.
        round_seed: The round's public seed.
        sender: The sending client's id.
        receiver: The receiving client's id.
        random_bytes: Where the nonce comes from; the operating system's CSPRNG when omitted.

    Returns:
        The encrypted share, ready to relay.
    """
    nonce = (random_bytes or os.urandom)(_NONCE_BYTES)
    ad = _associated_data(round_seed, server_round, sender, receiver)
    body = ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)
    return EncryptedShare(sender=sender, receiver=receiver, ciphertext=nonce + body)


def decrypt_share(
    key: bytes,
    share: EncryptedShare,
    *,
    server_round: int,
    round_seed: bytes,
    receiver: str,
) -> bytes:
    """Decrypt a share addressed to ``receiver``, refusing anything else.

    Args:
        key: The key of ``receiver`` with the share's sender, from :func:`derive_share_key`.
        share: The relayed share.
        server_round: The round the receiver is in.
        round_seed: That round's public seed.
        receiver: The id of the client decrypting.

    Returns:
        The plaintext.

    Raises:
        ShareRefusedError: The share names another receiver, is too short, or fails
            authentication (tampered with, or encrypted for another client or round).
    """
    if share.receiver != receiver:
        raise ShareRefusedError(
            f"share from {share.sender!r} is addressed to {share.receiver!r}, not {receiver!r}"
        )
    if len(share.ciphertext) < _NONCE_BYTES + _TAG_BYTES:
        raise ShareRefusedError(f"share from {share.sender!r} is truncated")
    nonce, body = share.ciphertext[:_NONCE_BYTES], share.ciphertext[_NONCE_BYTES:]
    ad = _associated_data(round_seed, server_round, share.sender, receiver)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, ad)
    except InvalidTag:
        raise ShareRefusedError(
            f"share from {share.sender!r} failed authentication: it was tampered with, or was "
            f"not encrypted for {receiver!r} in this round"
        ) from None
