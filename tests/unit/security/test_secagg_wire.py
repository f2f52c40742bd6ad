"""The SecAgg stage messages as JSON: every message round-trips, hostile bytes are refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from flctl.core.errors import SecAggError
from flctl.security import (
    EncryptedShare,
    KeyAdvertisement,
    MaskedInputRequest,
    SecAggSetup,
    SecAggTask,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    decode_key_advertisement,
    decode_masked_input_request,
    decode_share_keys_reply,
    decode_share_keys_request,
    decode_unmask_reply,
    decode_unmask_request,
    encode_message,
)

AD = KeyAdvertisement("c1", bytes(range(32)), bytes(range(32, 64)))
SHARE = EncryptedShare("c1", "c2", b"\x00\xff" * 70)


@pytest.mark.parametrize(
    ("message", "decode"),
    [
        (AD, decode_key_advertisement),
        (
            ShareKeysRequest((AD, KeyAdvertisement("c3", b"k" * 32, b"m" * 32))),
            decode_share_keys_request,
        ),
        (ShareKeysReply("c1", (SHARE,)), decode_share_keys_reply),
        (MaskedInputRequest(("c1", "c2"), (SHARE,)), decode_masked_input_request),
        (UnmaskRequest(("c1", "c2", "c3")), decode_unmask_request),
        (UnmaskReply("c2", {"c1": b"s" * 55}, {"c3": b"k" * 55}), decode_unmask_reply),
    ],
    ids=lambda v: type(v).__name__ if not callable(v) else "",
)
def test_every_message_round_trips_as_json(message: object, decode: object) -> None:
    data = encode_message(message)  # type: ignore[arg-type]
    assert isinstance(json.loads(data), dict)  # plain JSON, never a pickle
    assert decode(data) == message  # type: ignore[operator]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x80\x03pickle", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"client_id": "c1", "encryption_key": "AAAA"}', "not a base64 string"),
        (b'{"client_id": "", "encryption_key": "AA==", "mask_key": "AA=="}', "a client id must"),
        (b'{"client_id": "c1", "encryption_key": "!!!", "mask_key": "AA=="}', "not base64"),
        (b'{"client_id": "c1", "encryption_key": "AA==", "mask_key": "AA==", "x": 1}', "unknown"),
        (
            b'{"client_id": "c1", "encryption_key": "' + b"A" * 5000 + b'", "mask_key": "AA=="}',
            "at most 1024",
        ),
    ],
)
def test_malformed_messages_are_refused_as_protocol_violations(data: bytes, needle: str) -> None:
    with pytest.raises(SecAggError, match=needle):
        decode_key_advertisement(data)


def test_shares_and_maps_are_checked_too() -> None:
    with pytest.raises(SecAggError, match="`shares` is not a list"):
        decode_share_keys_reply(b'{"client_id": "c1", "shares": {}}')
    with pytest.raises(SecAggError, match="a share is not an object"):
        decode_masked_input_request(b'{"key_sharers": [], "shares": [1]}')
    with pytest.raises(SecAggError, match="`self_mask_shares` is not a dict"):
        decode_unmask_reply(b'{"client_id": "c1", "self_mask_shares": [], "mask_key_shares": {}}')
    with pytest.raises(SecAggError, match="a client id must"):
        decode_unmask_request(b'{"survivors": [3]}')


def _task(**overrides: object) -> SecAggTask:
    setup = SecAggSetup.create(
        4,
        ["c1", "c2", "c3"],
        threshold=0.6,
        num_shares=0,
        clip_range=0.5,
        quantization_bits=20,
        num_elements=11,
        round_seed=hashlib.sha256(b"seed").digest(),
    )
    return SecAggTask(setup, **{"max_weight": 100.0, "stage_timeout_s": 3.0, **overrides})  # type: ignore[arg-type]


def test_the_task_entry_round_trips_and_weighs_the_client() -> None:
    task = _task()
    assert SecAggTask.from_json(task.to_json()) == task
    assert task.weight(50) == 0.5 and task.weight(1000) == 1.0 and not task.is_private
    private = _task(clip_norm=1.5)
    assert private.is_private and private.weight(50) == 1.0
    assert SecAggTask.from_json(private.to_json()) == private


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d["setup"].update(threshold=1), "threshold must be above half"),
        (lambda d: d["setup"].update(participants=["c2", "c1", "c3"]), "sorted"),
        (lambda d: d["setup"].update(modulus_bits=64), "need modulus_bits 32"),
        (lambda d: d.update(max_weight=0), "max_weight must be finite and > 0"),
        (lambda d: d["setup"].update(num_elements="11"), "`num_elements` is not a int"),
    ],
)
def test_a_malformed_task_entry_is_refused(edit: object, needle: str) -> None:
    doc = json.loads(_task().to_json())
    edit(doc)  # type: ignore[operator]
    with pytest.raises(SecAggError, match=needle):
        SecAggTask.from_json(json.dumps(doc))
