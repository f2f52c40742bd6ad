"""The SecAgg+ round, in process: clients and coordinator state machines, dropouts, refusals."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import pytest
from numpy.typing import NDArray

from flctl.core.errors import SecAggError, SecAggThresholdError
from flctl.security import (
    KeyAdvertisement,
    MaskedInputRequest,
    SecAggClient,
    SecAggResult,
    SecAggServer,
    SecAggSetup,
    SecAggStage,
    ShareKeysReply,
    UnmaskRequest,
)
from flctl.tensors import Quantizer

CHUNK = 700  # not a divisor of the sizes below, so chunks straddle ChaCha20 blocks unevenly


def seeded(label: str) -> Callable[[int], bytes]:
    """A reproducible byte source, so no statistical assertion here can flake."""
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
            counter += 1
        return out[:n]

    return draw


def make_setup(
    n: int, *, num_elements: int = 2000, threshold: float = 0.6, num_shares: int = 0
) -> SecAggSetup:
    return SecAggSetup.create(
        7,
        [f"c{i}" for i in range(1, n + 1)],
        threshold=threshold,
        num_shares=num_shares,
        clip_range=1.0,
        quantization_bits=24,
        num_elements=num_elements,
        round_seed=hashlib.sha256(f"round {n}".encode()).digest(),
    )


def make_updates(setup: SecAggSetup) -> dict[str, NDArray[np.float64]]:
    rng = np.random.default_rng(len(setup.participants))
    return {cid: rng.normal(0, 0.3, setup.num_elements) for cid in setup.participants}


@dataclass
class Run:
    """One in-process round: the engine's part, with hooks where a test breaks something."""

    setup: SecAggSetup
    updates: dict[str, NDArray[np.float64]]
    drop_after_advertise: Collection[str] = ()
    drop_after_share: Collection[str] = ()
    drop_after_upload: Collection[str] = ()
    clients: dict[str, SecAggClient] = field(init=False)
    server: SecAggServer = field(init=False)
    masked: dict[str, NDArray[np.uint64]] = field(default_factory=dict, init=False)
    ads: dict[str, KeyAdvertisement] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.quantizer = Quantizer(
            self.setup.clip_range, self.setup.quantization_bits, len(self.setup.participants)
        )
        assert self.quantizer.modulus_bits == self.setup.modulus_bits
        self.server = SecAggServer(self.setup)
        self.clients = {
            cid: SecAggClient(self.setup, cid, random_bytes=seeded(cid))
            for cid in self.setup.participants
        }
        self.total = np.zeros(self.setup.num_elements, dtype=self.quantizer.dtype)

    def advertise(self) -> None:
        for cid, client in self.clients.items():
            self.ads[cid] = client.advertise_keys()
            self.server.receive_keys(self.ads[cid])

    def share(self) -> None:
        for cid, request in self.server.share_keys_requests().items():
            if cid not in self.drop_after_advertise:
                self.server.receive_shares(self.clients[cid].share_keys(request))

    def masked_input_requests(self) -> dict[str, MaskedInputRequest]:
        return self.server.masked_input_requests()

    def upload(self, requests: dict[str, MaskedInputRequest]) -> None:
        for cid, request in requests.items():
            if cid in self.drop_after_share:
                continue
            client = self.clients[cid]
            client.receive_shares(request)
            update = self.updates[cid]
            out = np.empty(self.setup.num_elements, dtype=self.quantizer.dtype)
            for offset in range(0, len(update), CHUNK):
                q = self.quantizer.quantize(update[offset : offset + CHUNK])
                out[offset : offset + CHUNK] = client.mask(q, offset)
            self.masked[cid] = out
            self.server.receive_masked_input(cid, len(out))
            self.total += out

    def unmask(self) -> SecAggResult:
        for cid, request in self.server.unmask_requests().items():
            if cid not in self.drop_after_upload:
                self.server.receive_unmask(self.clients[cid].unmask(request))
        return self.server.finish()

    def run(self) -> tuple[SecAggResult, NDArray[np.float64]]:
        self.advertise()
        self.share()
        self.upload(self.masked_input_requests())
        result = self.unmask()
        return result, self.dequantized(result)

    def dequantized(self, result: SecAggResult) -> NDArray[np.float64]:
        pieces = [
            result.unmask(self.total[o : o + CHUNK], o)
            for o in range(0, self.setup.num_elements, CHUNK)
        ]
        return self.quantizer.dequantize_sum(np.concatenate(pieces), result.num_inputs)

    def check_sum(self, result: SecAggResult, got: NDArray[np.float64]) -> None:
        want = np.sum([np.clip(self.updates[c], -1, 1) for c in result.survivors], axis=0)
        bound = self.quantizer.max_sum_error(result.num_inputs)
        assert np.abs(got - want).max() <= bound * (1 + 1e-9)


@pytest.mark.parametrize(
    ("n", "num_shares"),
    [(5, 0), (9, 4)],
    ids=["SecAgg, all share with all", "SecAgg+, 4 neighbours"],
)
def test_a_round_survives_a_dropout_after_key_sharing_and_one_after_upload(
    n: int, num_shares: int
) -> None:
    setup = make_setup(n, num_shares=num_shares)
    run = Run(setup, make_updates(setup), drop_after_share={"c2"}, drop_after_upload={"c4"})
    result, got = run.run()
    assert result.survivors == tuple(c for c in setup.participants if c != "c2")
    assert result.dropouts == {"c2": SecAggStage.MASKED_INPUT, "c4": SecAggStage.UNMASK}
    run.check_sum(result, got)
    # every masked input alone looks nothing like its update
    for cid, masked in run.masked.items():
        assert abs(np.corrcoef(masked.astype(np.float64), run.updates[cid])[0, 1]) < 0.1


def test_each_masked_input_alone_is_uncorrelated_with_its_update() -> None:
    # 100k elements per update: under independence the correlation's spread is 1/sqrt(1e5),
    # about 0.003; the byte source is seeded, so the outcome is fixed, not a coin toss.
    setup = make_setup(3, num_elements=100_000)
    updates = {
        cid: np.linspace(-0.9, 0.9, setup.num_elements) * (i + 1) / 3
        for i, cid in enumerate(setup.participants)
    }
    run = Run(setup, updates)
    result, got = run.run()
    run.check_sum(result, got)
    for cid, masked in run.masked.items():
        r = np.corrcoef(masked.astype(np.float64), updates[cid])[0, 1]
        assert abs(r) < 0.01, (cid, r)


def test_secagg_plus_shares_with_neighbours_only() -> None:
    setup = make_setup(9, num_shares=3)  # rounded up to 4 neighbours: 2 on each side
    assert setup.num_neighbours == 4 and setup.threshold == 3
    for cid in setup.participants:
        assert len(setup.neighbours(cid)) == 4
        assert all(cid in setup.neighbours(j) for j in setup.neighbours(cid))
    run = Run(setup, make_updates(setup))
    run.advertise()
    run.share()
    for cid, request in run.masked_input_requests().items():
        assert {s.sender for s in request.shares} == set(setup.neighbours(cid))
    # the graph follows the public seed: both ends compute the same one, another seed moves it
    again = make_setup(9, num_shares=3)
    assert all(again.neighbours(c) == setup.neighbours(c) for c in setup.participants)
    moved = dataclasses.replace(setup, round_seed=b"\x01" * 32)
    assert any(moved.neighbours(c) != setup.neighbours(c) for c in setup.participants)


def test_a_dropout_before_key_sharing_is_left_out_of_every_mask() -> None:
    setup = make_setup(5)
    run = Run(setup, make_updates(setup), drop_after_advertise={"c5"}, drop_after_upload={"c1"})
    result, got = run.run()
    assert result.dropouts == {"c5": SecAggStage.SHARE_KEYS, "c1": SecAggStage.UNMASK}
    assert "c5" not in result.survivors
    run.check_sum(result, got)


def test_too_many_dropouts_after_key_sharing_fail_with_the_reason() -> None:
    setup = make_setup(5)  # t = 3
    run = Run(setup, make_updates(setup), drop_after_share={"c1", "c2", "c3"})
    run.advertise()
    run.share()
    run.upload(run.masked_input_requests())
    with pytest.raises(SecAggThresholdError, match="only 2 of .* threshold is 3") as info:
        run.server.unmask_requests()
    assert "dropped: c1, c2, c3" in info.value.message
    assert run.server.stage is SecAggStage.DONE


def test_too_many_dropouts_after_upload_fail_with_the_reason() -> None:
    setup = make_setup(5)
    run = Run(setup, make_updates(setup), drop_after_upload={"c1", "c2", "c3"})
    run.advertise()
    run.share()
    run.upload(run.masked_input_requests())
    with pytest.raises(SecAggThresholdError, match="threshold is 3"):
        run.unmask()


def test_too_few_clients_advertising_fail_before_any_share_is_made() -> None:
    setup = make_setup(5)
    server = SecAggServer(setup)
    for cid in ("c1", "c2"):
        server.receive_keys(SecAggClient(setup, cid).advertise_keys())
    with pytest.raises(SecAggThresholdError, match="no client keeps 3 live share holders"):
        server.share_keys_requests()
    assert server.dropouts == dict.fromkeys(("c1", "c2", "c3", "c4", "c5"), "advertise_keys")


def test_a_client_never_reveals_both_shares_of_one_client() -> None:
    setup = make_setup(5)
    run = Run(setup, make_updates(setup))
    run.advertise()
    run.share()
    run.upload(run.masked_input_requests())
    c1 = run.clients["c1"]
    first = c1.unmask(UnmaskRequest(setup.participants))
    assert set(first.self_mask_shares) == set(setup.participants) and not first.mask_key_shares
    # a second request that now calls c2 dropped would get c2's mask key share too
    with pytest.raises(SecAggError, match="already answered"):
        c1.unmask(UnmaskRequest(("c1", "c3", "c4", "c5")))
    assert c1.stage is SecAggStage.DONE


def test_a_client_refuses_survivors_that_never_shared_keys_or_are_too_few() -> None:
    setup = make_setup(5)
    run = Run(setup, make_updates(setup), drop_after_advertise={"c5"})
    run.advertise()
    run.share()
    run.upload(run.masked_input_requests())
    with pytest.raises(SecAggError, match=r"\['c5'\] never shared keys"):
        run.clients["c1"].unmask(UnmaskRequest(setup.participants))
    with pytest.raises(SecAggError, match="already failed"):
        run.clients["c1"].mask(np.zeros(3, np.uint32), 0)
    with pytest.raises(SecAggThresholdError, match="only 2 .* survived"):
        run.clients["c2"].unmask(UnmaskRequest(("c2", "c3")))


def test_a_tampered_share_is_refused_and_the_round_goes_on() -> None:
    setup = make_setup(5)
    run = Run(setup, make_updates(setup))
    run.advertise()
    run.share()
    requests = run.masked_input_requests()
    share = requests["c2"].shares[0]
    flipped = bytes([share.ciphertext[0], share.ciphertext[1] ^ 0x80, *share.ciphertext[2:]])
    requests["c2"] = dataclasses.replace(
        requests["c2"],
        shares=(dataclasses.replace(share, ciphertext=flipped), *requests["c2"].shares[1:]),
    )
    run.upload(requests)
    assert "failed authentication" in run.clients["c2"].refused_shares[share.sender]
    result = run.unmask()
    run.check_sum(result, run.dequantized(result))


def test_a_share_for_someone_else_is_refused_and_the_round_goes_on() -> None:
    setup = make_setup(5)
    run = Run(setup, make_updates(setup))
    run.advertise()
    run.share()
    requests = run.masked_input_requests()
    for_c3 = next(s for s in requests["c3"].shares if s.sender == "c1")
    mine = tuple(s for s in requests["c2"].shares if s.sender != "c1")
    requests["c2"] = dataclasses.replace(requests["c2"], shares=(for_c3, *mine))
    run.upload(requests)
    assert run.clients["c2"].refused_shares == {
        "c1": "share from 'c1' is addressed to 'c3', not 'c2'"
    }
    result = run.unmask()
    run.check_sum(result, run.dequantized(result))


def test_the_coordinator_refuses_bad_messages_and_the_round_goes_on() -> None:
    setup = make_setup(6)  # t = 4
    run = Run(setup, make_updates(setup))
    run.advertise()
    run.server.receive_keys(run.ads["c1"])  # a retry of the same message is accepted
    other = SecAggServer(setup)
    other.receive_keys(run.ads["c1"])
    with pytest.raises(SecAggError, match="other keys a second time"):
        other.receive_keys(dataclasses.replace(run.ads["c1"], mask_key=run.ads["c4"].mask_key))
    with pytest.raises(SecAggError, match="not fresh"):
        other.receive_keys(
            dataclasses.replace(run.ads["c2"], mask_key=run.ads["c1"].encryption_key)
        )
    with pytest.raises(SecAggError, match="low order"):
        other.receive_keys(dataclasses.replace(run.ads["c3"], mask_key=bytes(32)))
    requests = run.server.share_keys_requests()
    # c6 leaves a neighbour out of its shares: refused, so it counts as dropped at share_keys
    reply = run.clients["c6"].share_keys(requests.pop("c6"))
    with pytest.raises(SecAggError, match="one share to each"):
        run.server.receive_shares(ShareKeysReply("c6", reply.shares[1:]))
    with pytest.raises(SecAggError, match="refused earlier"):
        run.server.receive_shares(reply)
    for cid, request in requests.items():
        run.server.receive_shares(run.clients[cid].share_keys(request))
    requests3 = run.masked_input_requests()
    assert "c6" not in requests3
    # c5's masked input has the wrong length: refused, so it is not in the sum
    with pytest.raises(SecAggError, match="1999 elements, not 2000"):
        run.server.receive_masked_input("c5", 1999)
    run.drop_after_share = {"c5"}
    run.upload(requests3)
    with pytest.raises(SecAggError, match="the first one counts"):
        run.server.receive_masked_input("c1", 2000)
    result = run.unmask()
    assert result.survivors == ("c1", "c2", "c3", "c4")
    assert set(result.refusals) == {"c6", "c5"}
    assert result.dropouts == {"c6": SecAggStage.SHARE_KEYS, "c5": SecAggStage.MASKED_INPUT}
    run.check_sum(result, run.dequantized(result))


def test_clients_refuse_a_coordinator_that_breaks_the_protocol() -> None:
    setup = make_setup(9, num_shares=2)
    run = Run(setup, make_updates(setup))
    run.advertise()
    requests = run.server.share_keys_requests()
    c1 = run.clients["c1"]
    stranger = next(c for c in setup.participants if c not in setup.holders("c1"))
    ads = {ad.client_id: ad for r in requests.values() for ad in r.advertisements}
    bad = dataclasses.replace(
        requests["c1"], advertisements=(*requests["c1"].advertisements, ads[stranger])
    )
    with pytest.raises(SecAggError, match=f"relayed keys of '{stranger}', not a neighbour"):
        c1.share_keys(bad)
    with pytest.raises(SecAggError, match="already failed"):
        c1.share_keys(requests["c1"])
    # keys that repeat (the coordinator handing c2 its own keys under a neighbour's name)
    c2 = run.clients["c2"]
    own = ads["c2"]
    fake = [
        dataclasses.replace(own, client_id=j) if i == 0 else ads[j]
        for i, j in enumerate(setup.neighbours("c2"))
    ]
    with pytest.raises(SecAggError, match="not all distinct"):
        c2.share_keys(dataclasses.replace(requests["c2"], advertisements=tuple(fake)))
    # out of order
    with pytest.raises(SecAggError, match="masked_input request came while waiting for share_keys"):
        run.clients["c3"].receive_shares(MaskedInputRequest(setup.participants, ()))


def test_the_setup_derives_threshold_neighbours_and_modulus() -> None:
    five = make_setup(5)
    assert (five.threshold, five.num_neighbours, five.modulus_bits) == (3, 4, 32)
    assert make_setup(10, threshold=0.7).threshold == 7  # not 8: 0.7 * 10 is not above 7
    assert make_setup(4, threshold=0.51).threshold == 3  # above half of 4
    assert make_setup(9, num_shares=50).num_neighbours == 8
    assert make_setup(300).modulus_bits == 64
    for n, bits in ((256, 24), (257, 24), (3, 32), (5000, 20)):
        setup = SecAggSetup.create(
            1,
            [f"c{i}" for i in range(n)],
            threshold=0.6,
            num_shares=2,
            clip_range=1.0,
            quantization_bits=bits,
            num_elements=1,
        )
        assert setup.modulus_bits == Quantizer(1.0, bits, n).modulus_bits
    with pytest.raises(SecAggThresholdError, match="at least 2 clients"):
        make_setup(1)
    with pytest.raises(ValueError, match="at most 65535"):
        make_setup(65536, num_shares=2)
    with pytest.raises(ValueError, match="threshold"):
        make_setup(5, threshold=0.5)
    with pytest.raises(SecAggError, match="not a participant"):
        SecAggClient(five, "c9")
