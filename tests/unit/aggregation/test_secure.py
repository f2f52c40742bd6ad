"""The masked sum of a secure round, in process: masked inputs in, FedAvg's mean out.

Clients mask their real update files (:class:`flctl.client.SecAggParticipant`), the
coordinator's :class:`MaskedSum` adds the masked inputs as they come and writes the mean with
the protocol's unmasking terms: the result is FedAvg of the same updates within the bound the
sum reports, and no masked input tells anything about its update.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from flctl.aggregation import MaskedSum, fedavg_in_memory
from flctl.client import SecAggParticipant
from flctl.core.errors import InconsistentUpdatesError, SecAggError
from flctl.security import (
    SecAggResult,
    SecAggServer,
    SecAggSetup,
    SecAggTask,
    decode_key_advertisement,
    decode_share_keys_reply,
    decode_unmask_reply,
    encode_message,
)
from flctl.tensors import (
    MaskedWriter,
    SecureLayout,
    encode_update,
    iter_masked,
    load_parameters,
    read_spec,
    save_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N = 4
FEATURES = 25_000  # 50k floats: correlations below 0.01 are 2 standard deviations... times 5


def _model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(2, FEATURES, generator=gen) * 0.1,
        "a.bias": torch.randn(2, generator=gen) * 0.1,
        "b.weight": torch.randn(7, 3, generator=gen).double() * 0.1,
        "steps": torch.tensor([5 + seed], dtype=torch.int64),
    }


@pytest.fixture
def round_files(tmp_path: Path) -> tuple[Path, dict[str, Path], dict[str, dict[str, torch.Tensor]]]:
    base = tmp_path / "base.safetensors"
    base_params = _model(0)
    save_parameters(base_params, base)
    trained = {}
    files = {}
    for i in range(1, N + 1):
        cid = f"c{i}"
        gen = torch.Generator().manual_seed(100 + i)
        params = {
            k: (v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.05)
            if v.is_floating_point()
            else v + i
            for k, v in base_params.items()
        }
        trained[cid] = params
        files[cid] = tmp_path / f"{cid}.update"
        # half the clients send a delta, half their full model: any encoding masks alike
        encode_update(
            base, params, files[cid], encoding="delta" if i % 2 else "full", dtype="float32"
        )
    return base, files, trained


def _task(base: Path, *, clip_norm: float = 0.0, max_weight: float = 100.0) -> SecAggTask:
    setup = SecAggSetup.create(
        3,
        [f"c{i}" for i in range(1, N + 1)],
        threshold=0.6,
        num_shares=0,
        clip_range=1.0,
        quantization_bits=24,
        num_elements=SecureLayout.of(read_spec(base)).num_elements,
        round_seed=hashlib.sha256(b"a round").digest(),
    )
    return SecAggTask(setup, max_weight, 5.0, clip_norm)


def _run(
    base: Path,
    files: dict[str, Path],
    examples: dict[str, int],
    task: SecAggTask,
    out: Path,
    *,
    no_unmask: tuple[str, ...] = (),
) -> tuple[SecAggResult, MaskedSum, dict[str, Path]]:
    """The protocol's messages as the transports carry them (JSON), and the masked sum."""
    server = SecAggServer(task.setup)
    clients = {cid: SecAggParticipant(task, cid) for cid in files}
    for p in clients.values():
        server.receive_keys(decode_key_advertisement(p.advertisement()))
    for cid, request in server.share_keys_requests().items():
        reply = clients[cid].share_keys(encode_message(request))
        server.receive_shares(decode_share_keys_reply(reply))
    masked = MaskedSum(SecureLayout.of(read_spec(base)), task.setup.modulus_bits, out)
    paths = {}
    for cid, request in server.masked_input_requests().items():
        clients[cid].receive_shares(encode_message(request))
        paths[cid] = out / f"{cid}.masked"
        clients[cid].write_masked(base, files[cid], examples[cid], paths[cid])
        server.receive_masked_input(cid, task.setup.num_elements)
        masked.add(paths[cid])
    for cid, request in server.unmask_requests().items():
        if cid not in no_unmask:
            reply = clients[cid].unmask(encode_message(request))
            server.receive_unmask(decode_unmask_reply(reply))
    return server.finish(), masked, paths


def test_the_unmasked_mean_is_fedavg_within_its_bound(tmp_path: Path, round_files) -> None:  # noqa: ANN001
    base, files, trained = round_files
    examples = {"c1": 10, "c2": 40, "c3": 25, "c4": 250}  # c4 weighs as max_weight
    task = _task(base)
    result, masked, paths = _run(base, files, examples, task, tmp_path, no_unmask=("c4",))
    assert result.num_inputs == N  # c4 sent no shares after its upload: its input still counts
    out = tmp_path / "mean.safetensors"
    info = masked.write_mean(
        base, out, unmask=result.unmask, quantizer=_quantizer(task), num_inputs=N
    )
    weights = [min(examples[c], 100) for c in sorted(files)]
    want = fedavg_in_memory([trained[c] for c in sorted(files)], weights)
    got = load_parameters(out)
    assert info.total_weight == pytest.approx(sum(weights) / 100, abs=1e-6)
    assert 0 < info.error_bound < 1e-5
    for name in ("a.weight", "a.bias", "b.weight"):
        diff = (got[name].double() - want[name].double()).abs().max().item()
        assert diff <= info.error_bound + 1e-7, name
        assert got[name].dtype == want[name].dtype
    # integer tensors are no client's: the base's
    assert got["steps"].tolist() == [5]
    # a masked input is uniformly random: no correlation with its client's delta
    base_params = load_parameters(base)
    for cid, path in paths.items():
        delta = (trained[cid]["a.weight"] - base_params["a.weight"]).reshape(-1).double().numpy()
        values = np.concatenate([chunk for _, chunk in iter_masked(path, 32)])
        (_, offset, count), *_ = SecureLayout.of(read_spec(base)).tensors
        assert offset == 0 and count == 2  # "a.bias" first: the layout is by name
        start = 2
        corr = np.corrcoef(values[start : start + delta.size].astype(np.float64), delta)[0, 1]
        assert abs(corr) < 0.02, (cid, corr)


def _quantizer(task: SecAggTask):  # noqa: ANN202
    from flctl.tensors import Quantizer

    s = task.setup
    return Quantizer(s.clip_range, s.quantization_bits, len(s.participants))


def test_central_dp_clips_each_delta_and_divides_by_the_denominator(
    tmp_path: Path, round_files
) -> None:  # noqa: ANN001
    base, files, trained = round_files
    task = _task(base, clip_norm=0.5)
    examples = dict.fromkeys(files, 10)
    result, masked, _ = _run(base, files, examples, task, tmp_path)
    out = tmp_path / "mean.safetensors"
    info = masked.write_mean(
        base, out, unmask=result.unmask, quantizer=_quantizer(task), num_inputs=N, denominator=8.0
    )
    assert info.divisor == 8.0 and info.total_weight == pytest.approx(N, abs=1e-5)
    base_params = load_parameters(base)
    floats = ["a.bias", "a.weight", "b.weight"]
    want = {name: torch.zeros_like(base_params[name], dtype=torch.float64) for name in floats}
    for cid in files:
        deltas = {n: trained[cid][n].double() - base_params[n].double() for n in floats}
        norm = float(sum((d * d).sum() for d in deltas.values())) ** 0.5
        for n in floats:
            want[n] += deltas[n] * min(1.0, 0.5 / norm)
    got = load_parameters(out)
    for n in floats:
        expected = base_params[n].double() + want[n] / 8.0
        assert (got[n].double() - expected).abs().max().item() <= info.error_bound + 1e-7


def test_a_sum_that_still_holds_a_mask_is_refused(tmp_path: Path, round_files) -> None:  # noqa: ANN001
    base, files, _ = round_files
    task = _task(base)
    result, masked, _ = _run(base, files, dict.fromkeys(files, 10), task, tmp_path)
    with pytest.raises(SecAggError, match="masks were not all removed"):
        masked.write_mean(
            base,
            tmp_path / "out",
            unmask=lambda chunk, offset: chunk,  # the masks left in
            quantizer=_quantizer(task),
            num_inputs=N,
        )


def test_a_masked_input_of_the_wrong_length_is_not_added(tmp_path: Path, round_files) -> None:  # noqa: ANN001
    base, _, _ = round_files
    layout = SecureLayout.of(read_spec(base))
    short = tmp_path / "short.masked"
    with MaskedWriter(short, layout.num_elements - 1, 32) as writer:
        writer.write(np.zeros(layout.num_elements - 1, dtype=np.uint32))
    masked = MaskedSum(layout, 32, tmp_path)
    with pytest.raises(InconsistentUpdatesError, match="holds 50023 elements, not 50024"):
        masked.add(short)
    assert masked.count == 0
    with pytest.raises(InconsistentUpdatesError, match="not a masked input of 64 bits"):
        MaskedSum(layout, 64, tmp_path).add(short)
