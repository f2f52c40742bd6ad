"""SecAgg share encryption: X25519 + HKDF + ChaCha20-Poly1305 refuses anything not meant for us."""

from __future__ import annotations

import dataclasses

import pytest

from flctl.core.errors import SecAggError, ShareRefusedError
from flctl.security import (
    EncryptedShare,
    X25519KeyPair,
    check_public_key,
    decrypt_share,
    derive_share_key,
    encrypt_share,
)

ROUND_SEED = b"r" * 32


@pytest.fixture(scope="module")
def keys() -> dict[str, X25519KeyPair]:
    return {cid: X25519KeyPair.generate() for cid in ("c1", "c2", "c3")}


def key_of(keys: dict[str, X25519KeyPair], me: str, peer: str) -> bytes:
    return derive_share_key(keys[me].exchange(keys[peer].public_key), ROUND_SEED)


def sealed(keys: dict[str, X25519KeyPair], sender: str, receiver: str) -> EncryptedShare:
    return encrypt_share(
        key_of(keys, sender, receiver),
        b"the shares",
        server_round=3,
        round_seed=ROUND_SEED,
        sender=sender,
        receiver=receiver,
    )


def opened(
    keys: dict[str, X25519KeyPair],
    share: EncryptedShare,
    receiver: str,
    *,
    server_round: int = 3,
    round_seed: bytes = ROUND_SEED,
) -> bytes:
    return decrypt_share(
        key_of(keys, receiver, share.sender),
        share,
        server_round=server_round,
        round_seed=round_seed,
        receiver=receiver,
    )


def test_the_receiver_opens_its_share(keys: dict[str, X25519KeyPair]) -> None:
    share = sealed(keys, "c1", "c2")
    assert b"the shares" not in share.ciphertext
    assert opened(keys, share, "c2") == b"the shares"
    assert key_of(keys, "c1", "c2") == key_of(keys, "c2", "c1")
    assert key_of(keys, "c1", "c2") != key_of(keys, "c1", "c3")


@pytest.mark.parametrize("position", [0, 11, 12, 20, -1])
def test_a_tampered_share_is_refused(keys: dict[str, X25519KeyPair], position: int) -> None:
    share = sealed(keys, "c1", "c2")
    raw = bytearray(share.ciphertext)
    raw[position] ^= 0x01
    with pytest.raises(ShareRefusedError, match="failed authentication"):
        opened(keys, dataclasses.replace(share, ciphertext=bytes(raw)), "c2")


def test_a_share_for_someone_else_is_refused(keys: dict[str, X25519KeyPair]) -> None:
    share = sealed(keys, "c1", "c3")
    with pytest.raises(ShareRefusedError, match="addressed to 'c3', not 'c2'"):
        opened(keys, share, "c2")
    # relabelled for c2, it still was not encrypted for c2
    with pytest.raises(ShareRefusedError, match="failed authentication"):
        opened(keys, dataclasses.replace(share, receiver="c2"), "c2")
    # nor can its sender be swapped for a client c2 shares a key with
    with pytest.raises(ShareRefusedError, match="failed authentication"):
        opened(keys, dataclasses.replace(share, sender="c3", receiver="c2"), "c2")


def test_a_share_is_bound_to_its_round_and_direction(keys: dict[str, X25519KeyPair]) -> None:
    share = sealed(keys, "c1", "c2")
    with pytest.raises(ShareRefusedError, match="failed authentication"):
        opened(keys, share, "c2", server_round=4)
    with pytest.raises(ShareRefusedError, match="failed authentication"):
        opened(keys, share, "c2", round_seed=b"s" * 32)
    # reflected back to its sender (same pair key, other direction)
    reflected = EncryptedShare(sender="c2", receiver="c1", ciphertext=share.ciphertext)
    with pytest.raises(ShareRefusedError, match="failed authentication"):
        opened(keys, reflected, "c1")
    with pytest.raises(ShareRefusedError, match="truncated"):
        opened(keys, dataclasses.replace(share, ciphertext=share.ciphertext[:20]), "c2")


def test_malformed_and_low_order_public_keys_are_refused() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        check_public_key(b"short")
    with pytest.raises(SecAggError, match="low order"):
        check_public_key(bytes(32))
    with pytest.raises(SecAggError, match="low order"):
        X25519KeyPair.generate().exchange((1).to_bytes(32, "little"))
    pair = X25519KeyPair.generate()
    check_public_key(pair.public_key)
    assert X25519KeyPair(pair.private_bytes()).public_key == pair.public_key
    assert pair.private_bytes().hex() not in repr(pair)
    with pytest.raises(ValueError, match="32 bytes"):
        X25519KeyPair(b"x")
