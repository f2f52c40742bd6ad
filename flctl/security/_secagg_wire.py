"""The SecAgg+ stage messages as JSON bytes, and the round's SecAgg task entry.

Whatever carries them (the ``SecAgg`` RPC of the gRPC transport, the in-process transport of
``flctl simulate``), the stage messages of :mod:`flctl.security._secagg_messages` travel as
UTF-8 JSON objects, bytes as standard base64: plain data, never a pickle. Every decoder takes
hostile input: it checks each field's type and size and raises :class:`SecAggError`
("malformed ...") on anything else, so a bad message is refused as a protocol violation of its
sender and the round goes on.

A round's fit task carries its SecAgg parameters under one config key, :data:`SECAGG_TASK_KEY`,
as the JSON of a :class:`SecAggTask`: the :class:`SecAggSetup` every participant shares, plus
how a client weighs and clips its update.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flctl.core.errors import SecAggError
from flctl.security._secagg import EncryptedShare
from flctl.security._secagg_messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    SecAggSetup,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)

__all__ = [
    "SECAGG_TASK_KEY",
    "SecAggTask",
    "decode_key_advertisement",
    "decode_masked_input_request",
    "decode_share_keys_reply",
    "decode_share_keys_request",
    "decode_unmask_reply",
    "decode_unmask_request",
    "encode_message",
]

#: The fit task config key whose value is the round's :class:`SecAggTask` (JSON).
SECAGG_TASK_KEY = "flctl.secagg"

_VERSION = 1
#: Client ids, as everywhere on the wire, are short strings.
_MAX_ID_BYTES = 256
#: A public key, a ciphertext (two Shamir shares and their framing) or a share's wire form.
_MAX_BLOB_BYTES = 1024
_MAX_ITEMS = 65535

_T = TypeVar("_T")

Message = (
    KeyAdvertisement
    | ShareKeysRequest
    | ShareKeysReply
    | MaskedInputRequest
    | UnmaskRequest
    | UnmaskReply
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _share_dict(share: EncryptedShare) -> dict[str, Any]:
    return {
        "sender": share.sender,
        "receiver": share.receiver,
        "ciphertext": _b64(share.ciphertext),
    }


def _ad_dict(ad: KeyAdvertisement) -> dict[str, Any]:
    return {
        "client_id": ad.client_id,
        "encryption_key": _b64(ad.encryption_key),
        "mask_key": _b64(ad.mask_key),
    }


def _to_dict(message: Message) -> dict[str, Any]:
    if isinstance(message, KeyAdvertisement):
        return _ad_dict(message)
    if isinstance(message, ShareKeysRequest):
        return {"advertisements": [_ad_dict(ad) for ad in message.advertisements]}
    if isinstance(message, ShareKeysReply):
        return {
            "client_id": message.client_id,
            "shares": [_share_dict(s) for s in message.shares],
        }
    if isinstance(message, MaskedInputRequest):
        return {
            "key_sharers": list(message.key_sharers),
            "shares": [_share_dict(s) for s in message.shares],
        }
    if isinstance(message, UnmaskRequest):
        return {"survivors": list(message.survivors)}
    return {
        "client_id": message.client_id,
        "self_mask_shares": {k: _b64(v) for k, v in message.self_mask_shares.items()},
        "mask_key_shares": {k: _b64(v) for k, v in message.mask_key_shares.items()},
    }


def encode_message(message: Message) -> bytes:
    """Return a stage message as compact UTF-8 JSON.

    Args:
        message: Any of the stage messages (:class:`KeyAdvertisement` ... :class:`UnmaskReply`).

    Returns:
        The JSON bytes the matching ``decode_*`` function reads back.
    """
    return json.dumps(_to_dict(message), separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- decoding


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SecAggError(f"malformed {what}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SecAggError(f"malformed {what}: not a JSON object")
    return value


def _get(obj: Mapping[str, Any], key: str, kind: type[_T], what: str) -> _T:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise SecAggError(f"malformed {what}: `{key}` is not a {kind.__name__}")
    return value


def _known(obj: Mapping[str, Any], keys: set[str], what: str) -> None:
    extra = sorted(set(obj) - keys)
    if extra:
        raise SecAggError(f"malformed {what}: unknown keys {extra[:5]}")


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode()) > _MAX_ID_BYTES:
        raise SecAggError(f"malformed {what}: a client id must be 1 to {_MAX_ID_BYTES} bytes")
    return value


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * _MAX_BLOB_BYTES:
        raise SecAggError(f"malformed {what}: not a base64 string of at most {_MAX_BLOB_BYTES} B")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise SecAggError(f"malformed {what}: not base64 ({exc})") from None


def _list(obj: Mapping[str, Any], key: str, what: str) -> list[Any]:
    items = _get(obj, key, list, what)
    if len(items) > _MAX_ITEMS:
        raise SecAggError(f"malformed {what}: `{key}` holds more than {_MAX_ITEMS} items")
    return items


def _ad(value: Any, what: str) -> KeyAdvertisement:
    if not isinstance(value, dict):
        raise SecAggError(f"malformed {what}: an advertisement is not an object")
    _known(value, {"client_id", "encryption_key", "mask_key"}, what)
    return KeyAdvertisement(
        _id(value.get("client_id"), what),
        _bytes(value.get("encryption_key"), what),
        _bytes(value.get("mask_key"), what),
    )


def _share(value: Any, what: str) -> EncryptedShare:
    if not isinstance(value, dict):
        raise SecAggError(f"malformed {what}: a share is not an object")
    _known(value, {"sender", "receiver", "ciphertext"}, what)
    return EncryptedShare(
        _id(value.get("sender"), what),
        _id(value.get("receiver"), what),
        _bytes(value.get("ciphertext"), what),
    )


def _ids(obj: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    return tuple(_id(v, what) for v in _list(obj, key, what))


def _share_map(obj: Mapping[str, Any], key: str, what: str) -> dict[str, bytes]:
    value = _get(obj, key, dict, what)
    if len(value) > _MAX_ITEMS:
        raise SecAggError(f"malformed {what}: `{key}` holds more than {_MAX_ITEMS} items")
    return {_id(k, what): _bytes(v, what) for k, v in value.items()}


def decode_key_advertisement(data: bytes) -> KeyAdvertisement:
    """Read a stage-1 :class:`KeyAdvertisement`.

    Raises:
        SecAggError: It is malformed.
    """
    return _ad(_load(data, "key advertisement"), "key advertisement")


def decode_share_keys_request(data: bytes) -> ShareKeysRequest:
    """Read a stage-2 :class:`ShareKeysRequest`.

    Raises:
        SecAggError: It is malformed.
    """
    what = "share-keys request"
    obj = _load(data, what)
    _known(obj, {"advertisements"}, what)
    return ShareKeysRequest(tuple(_ad(v, what) for v in _list(obj, "advertisements", what)))


def decode_share_keys_reply(data: bytes) -> ShareKeysReply:
    """Read a stage-2 :class:`ShareKeysReply`.

    Raises:
        SecAggError: It is malformed.
    """
    what = "share-keys reply"
    obj = _load(data, what)
    _known(obj, {"client_id", "shares"}, what)
    return ShareKeysReply(
        _id(obj.get("client_id"), what),
        tuple(_share(v, what) for v in _list(obj, "shares", what)),
    )


def decode_masked_input_request(data: bytes) -> MaskedInputRequest:
    """Read a stage-3 :class:`MaskedInputRequest`.

    Raises:
        SecAggError: It is malformed.
    """
    what = "masked-input request"
    obj = _load(data, what)
    _known(obj, {"key_sharers", "shares"}, what)
    return MaskedInputRequest(
        _ids(obj, "key_sharers", what),
        tuple(_share(v, what) for v in _list(obj, "shares", what)),
    )


def decode_unmask_request(data: bytes) -> UnmaskRequest:
    """Read a stage-4 :class:`UnmaskRequest`.

    Raises:
        SecAggError: It is malformed.
    """
    what = "unmask request"
    obj = _load(data, what)
    _known(obj, {"survivors"}, what)
    return UnmaskRequest(_ids(obj, "survivors", what))


def decode_unmask_reply(data: bytes) -> UnmaskReply:
    """Read a stage-4 :class:`UnmaskReply`.

    Raises:
        SecAggError: It is malformed.
    """
    what = "unmask reply"
    obj = _load(data, what)
    _known(obj, {"client_id", "self_mask_shares", "mask_key_shares"}, what)
    return UnmaskReply(
        _id(obj.get("client_id"), what),
        _share_map(obj, "self_mask_shares", what),
        _share_map(obj, "mask_key_shares", what),
    )


# ---------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class SecAggTask:
    """What a fit task of a SecAgg round tells its client (task config :data:`SECAGG_TASK_KEY`).

    Attributes:
        setup: The round's public SecAgg parameters, the same for every participant.
        max_weight: The client's weight is ``r = min(num_examples, max_weight) / max_weight``.
        stage_timeout_s: How long the coordinator waits at each key stage and the unmasking
            (the client's calls wait at least that long for an answer).
        clip_norm: Central DP: the client clips its delta to this L2 norm and weighs it 1
            (equal weights); 0.0 without DP.
    """

    setup: SecAggSetup
    max_weight: float
    stage_timeout_s: float
    clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_weight", "stage_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"clip_norm must be finite and >= 0, got {self.clip_norm!r}")

    @property
    def is_private(self) -> bool:
        """Whether the client clips to ``clip_norm`` with weight 1 (central DP)."""
        return self.clip_norm > 0

    def weight(self, num_examples: int) -> float:
        """The client's weight ``r`` in ``(0, 1]`` (1 with central DP: equal weights)."""
        if self.is_private:
            return 1.0
        return min(max(num_examples, 1), self.max_weight) / self.max_weight

    def to_json(self) -> str:
        """The task config value (compact JSON)."""
        s = self.setup
        return json.dumps(
            {
                "version": _VERSION,
                "setup": {
                    "server_round": s.server_round,
                    "round_seed": _b64(s.round_seed),
                    "participants": list(s.participants),
                    "threshold": s.threshold,
                    "num_neighbours": s.num_neighbours,
                    "clip_range": s.clip_range,
                    "quantization_bits": s.quantization_bits,
                    "modulus_bits": s.modulus_bits,
                    "num_elements": s.num_elements,
                },
                "max_weight": self.max_weight,
                "stage_timeout_s": self.stage_timeout_s,
                "clip_norm": self.clip_norm,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> SecAggTask:
        """Read the task config value back, checking every field.

        Raises:
            SecAggError: It is malformed, of another version, or its setup is inconsistent.
        """
        what = "SecAgg task"
        obj = _load(text.encode(), what)
        if obj.get("version") != _VERSION:
            raise SecAggError(
                f"the coordinator's SecAgg task is version {obj.get('version')!r}; this client "
                f"speaks version {_VERSION}"
            )
        _known(obj, {"version", "setup", "max_weight", "stage_timeout_s", "clip_norm"}, what)
        raw = _get(obj, "setup", dict, what)
        ints = (
            "server_round",
            "threshold",
            "num_neighbours",
            "quantization_bits",
            "modulus_bits",
            "num_elements",
        )
        _known(raw, {"round_seed", "participants", "clip_range", *ints}, what)

        def number(source: Mapping[str, Any], key: str) -> float:
            value = source.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SecAggError(f"malformed {what}: `{key}` is not a number")
            return float(value)

        try:
            setup = SecAggSetup(
                server_round=_get(raw, "server_round", int, what),
                round_seed=_bytes(raw.get("round_seed"), what),
                participants=_ids(raw, "participants", what),
                threshold=_get(raw, "threshold", int, what),
                num_neighbours=_get(raw, "num_neighbours", int, what),
                clip_range=number(raw, "clip_range"),
                quantization_bits=_get(raw, "quantization_bits", int, what),
                modulus_bits=_get(raw, "modulus_bits", int, what),
                num_elements=_get(raw, "num_elements", int, what),
            )
            return cls(
                setup,
                number(obj, "max_weight"),
                number(obj, "stage_timeout_s"),
                number(obj, "clip_norm"),
            )
        except ValueError as exc:
            raise SecAggError(f"malformed {what}: {exc}") from None
