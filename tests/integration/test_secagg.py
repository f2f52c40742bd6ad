"""Secure aggregation in real rounds: a coordinator on 127.0.0.1 with mutual TLS, real clients.

The tiny task trains deterministically from the model it is given, so each test computes the
clients' plaintext updates itself (the clients' own ``fit`` on the round's model) and checks
the committed model against plain FedAvg of them, within the quantization bound the round's
``secagg.unmasked`` event reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flctl.aggregation import fedavg_in_memory
from flctl.client import Client, Runner, SecAggParticipant
from flctl.coordinator import Coordinator
from flctl.core import Config, TaskContext, load_task
from flctl.core.events import Event
from flctl.store import BlobStore, SqlStore
from flctl.tensors import load_parameters
from tests.relay import Relay

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)

CLIENTS = ("c1", "c2", "c3", "c4", "c5")
SECAGG = {"enabled": True, "stage_timeout_s": 5.0}


def secure_project(project: Project, **sections: dict[str, Any]) -> Config:
    rounds = {"min_clients": 3, "deadline_s": 20.0, "quorum_timeout_s": 20.0}
    rounds.update(sections.pop("rounds", {}))
    secagg = {**SECAGG, **sections.pop("secagg", {})}
    return project.write(rounds=rounds, secagg=secagg, **sections)


def plain_updates(
    config: Config, base: dict[str, torch.Tensor], clients: Iterable[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each client's trained model from ``base``, as its own fit computes it."""
    task = load_task(config.task_path)
    out = {}
    for client_id in clients:
        partition = CLIENTS.index(client_id)
        context = TaskContext(
            role="client",
            seed=config.project.seed,
            client_id=client_id,
            partition_id=partition,
            num_partitions=config.data.num_partitions,
            config=dict(config.task),
        )
        params, _, _ = task.client_fn(context).fit(
            {k: v.clone() for k, v in base.items()},
            {**config.task, "server_round": 1},
        )
        out[client_id] = params
    return out


async def run_round(
    config: Config,
    clients: Iterable[str] = CLIENTS,
    *,
    runner_for: Callable[[Config, str, str], Runner] | None = None,
    on_runner_event: Callable[[str, str, dict[str, Any], asyncio.Event], None] | None = None,
    rounds: int = 1,
) -> list[Any]:
    """Start a coordinator and ``clients``, run ``rounds`` rounds; return their RoundInfos."""
    coordinator = Coordinator(config)
    address = await coordinator.start()
    stops: dict[str, asyncio.Event] = {}
    tasks = []
    for client_id in clients:
        make = runner_for or (
            lambda cfg, addr, cid: make_runner(cfg, addr, cid, partition=CLIENTS.index(cid))
        )
        runner = make(config, address, client_id)
        stop = stops[client_id] = asyncio.Event()
        if on_runner_event is not None:

            def listen(kind: str, details: dict[str, Any], cid: str = client_id) -> None:
                assert on_runner_event is not None
                on_runner_event(cid, kind, details, stops[cid])

            runner._on_event = listen
        tasks.append(asyncio.create_task(runner.run(stop)))
    client = admin(config, address)
    try:
        count = len(stops)
        await wait_until(lambda: len(coordinator._registry.connected()) == count)  # type: ignore[union-attr]
        reply = await client.start_round(rounds)
        ids = list(reply.round_ids)

        async def done() -> bool:
            status = await client.status(ids)
            terminal = ("committed", "failed", "cancelled", "rejected")
            return all(r.status in terminal for r in status.rounds)

        await wait_until(done, timeout=120, step=0.1)
        return list((await client.status(ids)).rounds)
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await coordinator.stop()


def recorded(config: Config) -> tuple[list[Event], dict[str, torch.Tensor], dict[str, Any]]:
    """The run's events, the initial model's weights and the head's (read from the state)."""
    store = SqlStore.open(config.state_path)
    blobs = BlobStore(config.state_path / "blobs")
    try:
        events = store.events_since(0, limit=100_000)
        models = {m.version: m for m in store.list_models()}
        base = load_parameters(blobs.path(models[1].digest))
        head = store.head()
        assert head is not None
        return (
            events,
            base,
            {
                "version": head.version,
                "weights": load_parameters(blobs.path(head.digest)),
                "config": head.config,
            },
        )
    finally:
        store.close()


def assert_close_to_fedavg(
    got: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]], bound: float
) -> float:
    want = fedavg_in_memory(updates, [1.0] * len(updates))
    worst = 0.0
    for name, value in want.items():
        diff = (got[name].double() - value.double()).abs().max().item()
        # the model's own float32 rounding of base + mean comes on top of the bound
        slack = bound + 2 * float(np.finfo(np.float32).eps) * (value.abs().max().item() + 1)
        assert diff <= slack, f"{name}: {diff} > {slack}"
        worst = max(worst, diff)
    return worst


def test_five_clients_commit_plain_fedavg_within_the_quantization_bound(project: Project) -> None:
    config = secure_project(project)
    (info,) = asyncio.run(run_round(config))
    assert info.status == "committed", info.reason
    assert info.num_clients == 5
    # round status: the outcome, from the round's events
    assert (info.secagg.outcome, info.secagg.survivors) == ("unmasked", 5)
    assert (info.secagg.participants, info.secagg.threshold) == (5, 3)
    assert dict(info.secagg.dropped) == {}
    events, base, head = recorded(config)
    types = [e.type for e in events]
    assert types.count("secagg.stage") == 3  # advertise_keys, share_keys, masked_input
    (started,) = [e for e in events if e.type == "secagg.started"]
    assert started.data["participants"] == list(CLIENTS)
    assert started.data["threshold"] == 3 and started.data["num_neighbours"] == 4
    (unmasked,) = [e for e in events if e.type == "secagg.unmasked"]
    assert unmasked.data["survivors"] == list(CLIENTS) and unmasked.data["dropouts"] == {}
    committed = next(e for e in events if e.type == "round.committed")
    assert committed.data["aggregation"] == "secure"
    assert head["config"]["secagg"]["enabled"] is True
    updates = plain_updates(config, base, CLIENTS)
    error = assert_close_to_fedavg(
        head["weights"], list(updates.values()), unmasked.data["error_bound"]
    )
    assert 0 < unmasked.data["error_bound"] < 1e-5 and error < 1e-5


def test_a_client_gone_after_key_sharing_and_one_after_upload_leave_the_right_sum(
    project: Project,
) -> None:
    # c2's fit returns NaN: it shared its keys but never uploads (its masked input cannot be
    # made); c5 leaves as soon as its masked input is accepted, before it sends any share
    config = secure_project(project, task={"nan_client": "c2"})

    def on_event(client_id: str, kind: str, details: dict[str, Any], stop: asyncio.Event) -> None:
        if client_id == "c5" and kind == "masked":
            stop.set()

    (info,) = asyncio.run(run_round(config, on_runner_event=on_event))
    assert info.status == "committed", info.reason
    assert info.num_clients == 4
    assert dict(info.secagg.dropped) == {
        "c2": "dropped at masked_input: no masked input in time",
        "c5": "dropped at unmask",
    }
    events, base, head = recorded(config)
    (unmasked,) = [e for e in events if e.type == "secagg.unmasked"]
    assert unmasked.data["survivors"] == ["c1", "c3", "c4", "c5"]
    assert unmasked.data["dropouts"] == {"c2": "masked_input", "c5": "unmask"}
    stages = {e.data["stage"]: e.data for e in events if e.type == "secagg.stage"}
    assert stages["masked_input"]["dropped"] == {
        "c2": "dropped at masked_input: no masked input in time"
    }
    updates = plain_updates(config, base, ["c1", "c3", "c4", "c5"])
    assert_close_to_fedavg(head["weights"], list(updates.values()), unmasked.data["error_bound"])


class _Failing(Client):
    """A client whose fit raises: it drops out of the round after sharing its keys."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner

    def get_parameters(self):  # noqa: ANN201
        return self.inner.get_parameters()

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        raise RuntimeError("the data disk is gone")


def test_too_many_dropouts_fail_the_round_with_the_reason(project: Project) -> None:
    # threshold 0.6 of 5: 3 holders must answer; c3, c4 and c5 fail their fit, 2 remain
    config = secure_project(project, rounds={"min_clients": 2})

    def runner_for(cfg: Config, address: str, client_id: str) -> Runner:
        wrap = _Failing if client_id in ("c3", "c4", "c5") else None
        return make_runner(cfg, address, client_id, partition=CLIENTS.index(client_id), wrap=wrap)

    (info,) = asyncio.run(run_round(config, runner_for=runner_for))
    assert info.status == "failed"
    assert "cannot be unmasked: only 2 of" in info.reason
    assert info.secagg.outcome == "failed" and info.secagg.reason in info.reason
    assert "the threshold is 3 (dropped: c3, c4, c5)" in info.reason
    events, _, head = recorded(config)
    assert head["version"] == 1  # nothing committed
    (failed,) = [e for e in events if e.type == "secagg.failed"]
    assert failed.data["stage"] == "masked_input" and failed.data["reason"] in info.reason
    assert failed.data["dropouts"] == dict.fromkeys(("c3", "c4", "c5"), "masked_input")
    assert not [e for e in events if e.type == "secagg.unmasked"]


class _Tampering(SecAggParticipant):
    """c1 breaks the protocol one way: a corrupt share, swapped shares, or a short input."""

    mode = ""

    def share_keys(self, request: bytes) -> bytes:
        import base64
        import json

        reply = json.loads(super().share_keys(request))
        shares = {s["receiver"]: s for s in reply["shares"]}
        if self.mode == "corrupt":  # a flipped bit in the share for c2: it fails authentication
            raw = bytearray(base64.b64decode(shares["c2"]["ciphertext"]))
            raw[20] ^= 1
            shares["c2"]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
        elif self.mode == "swap":  # c2's share addressed to c3 and c3's to c2
            shares["c2"]["receiver"], shares["c3"]["receiver"] = "c3", "c2"
        return json.dumps(reply).encode()

    def write_masked(self, base: Path, update: Path, num_examples: int, out: Path) -> None:
        super().write_masked(base, update, num_examples, out)
        if self.mode == "short":  # the same input less its last element (and header fixed)
            from flctl.tensors import MaskedWriter, iter_masked

            bits = self.task.setup.modulus_bits
            values = np.concatenate([c for _, c in iter_masked(out, bits)])[:-1]
            with MaskedWriter(out, len(values), bits) as writer:
                writer.write(values)


@pytest.mark.parametrize("mode", ["corrupt", "swap", "short"])
def test_a_client_breaking_the_protocol_is_refused_and_the_round_goes_on(
    project: Project, mode: str
) -> None:
    config = secure_project(project)
    refused: dict[str, dict[str, str]] = {}

    class Runner1(Runner):
        def _new_participant(self, task, client_id):  # noqa: ANN001, ANN202
            tampering = _Tampering(task, client_id)
            tampering.mode = mode
            return tampering

    def runner_for(cfg: Config, address: str, client_id: str) -> Runner:
        runner = make_runner(cfg, address, client_id, partition=CLIENTS.index(client_id))
        if client_id == "c1":
            runner.__class__ = Runner1
        return runner

    def on_event(client_id: str, kind: str, details: dict[str, Any], stop: asyncio.Event) -> None:
        if kind == "shares_refused":
            refused[client_id] = details["senders"]

    (info,) = asyncio.run(run_round(config, runner_for=runner_for, on_runner_event=on_event))
    assert info.status == "committed", info.reason
    events, base, head = recorded(config)
    (unmasked,) = [e for e in events if e.type == "secagg.unmasked"]
    if mode == "short":
        # refused as it streamed in, before anything reached the sum: c1 is out
        assert unmasked.data["survivors"] == ["c2", "c3", "c4", "c5"]
        assert unmasked.data["dropouts"] == {"c1": "masked_input"}
        assert "shape [10] differs from the model's [11]" in unmasked.data["refusals"]["c1"]
        rejected = [e for e in events if e.type == "update.rejected"]
        assert [e.client_id for e in rejected] == ["c1"] and rejected[0].data["malformed"]
        contributors = ["c2", "c3", "c4", "c5"]
    else:
        # the receivers refuse c1's bad shares; the others still rebuild c1's secrets
        assert unmasked.data["survivors"] == list(CLIENTS)
        receivers = ["c2"] if mode == "corrupt" else ["c2", "c3"]
        assert sorted(refused) == receivers
        assert all("failed authentication" in refused[r]["c1"] for r in receivers)
        contributors = list(CLIENTS)
    updates = plain_updates(config, base, contributors)
    assert_close_to_fedavg(head["weights"], list(updates.values()), unmasked.data["error_bound"])


def test_nothing_the_coordinator_writes_reveals_an_update(
    project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    """Every blob, row, event and log line of a secure round, against each plaintext update.

    300,002 elements per update: a masked input's correlation with its update has a standard
    deviation of 0.0018 if the two are independent, so 0.01 is 5.5 of them.
    """
    import hashlib
    import json
    import logging
    import re

    from flctl.tensors import MASKED_TENSOR, encode_update, read_spec, save_parameters

    caplog.set_level(logging.DEBUG)
    config = secure_project(project, task={"in_features": 150_000})
    (info,) = asyncio.run(run_round(config))
    assert info.status == "committed", info.reason
    events, base, head = recorded(config)
    updates = plain_updates(config, base, CLIENTS)
    names = sorted(n for n, t in base.items() if t.is_floating_point())  # the masked layout
    plain: dict[str, np.ndarray] = {}
    secrets: set[bytes] = set()
    digests: set[str] = set()
    for client_id, params in updates.items():
        delta = np.concatenate([(params[n] - base[n]).double().reshape(-1).numpy() for n in names])
        plain[client_id] = delta
        for values in (delta.astype(np.float32), *(params[n].numpy() for n in names)):
            raw = np.ascontiguousarray(values).tobytes()
            secrets.update(raw[i : i + 32] for i in (0, len(raw) // 2, len(raw) - 32))
        for encoding in ("full", "delta"):
            path = project.root / f"{client_id}.{encoding}"
            base_file = project.root / "base.safetensors"
            save_parameters(base, base_file)
            encode_update(base_file, params, path, encoding=encoding, dtype="float32")
            digests.add(hashlib.sha256(path.read_bytes()).hexdigest())

    # blobs: masked inputs (uncorrelated with every update), the initial and the new model
    masked_inputs = 0
    models: set[str] = set()
    for path in sorted(p for p in config.state_path.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() not in digests, path
        if path.parent.parent.name != "sha256":
            continue  # the database, lock and state files: read below
        if MASKED_TENSOR not in read_spec(path):
            models.add(path.parent.name + path.name)
            continue
        masked_inputs += 1
        header = 8 + int.from_bytes(data[:8], "little")
        values = np.frombuffer(data[header:], dtype="<u4").astype(np.float64)[:-1]
        for client_id, delta in plain.items():
            corr = abs(np.corrcoef(values, delta)[0, 1])
            assert corr < 0.01, (path.name, client_id, corr)
    assert masked_inputs == 5
    store = SqlStore.open(config.state_path)
    try:
        assert models == {m.digest for m in store.list_models()}  # versions 1 and 2 only
    finally:
        store.close()
    # rows and events (the database's files, byte for byte): no piece of any plaintext
    for path in config.state_path.glob("*.db*"):
        data = path.read_bytes()
        assert not [s for s in secrets if s in data], path
    numbers = {float(v) for delta in plain.values() for v in delta[:: max(1, len(delta) // 5000)]}
    for event in events:
        text = json.dumps(event.data)
        found = {float(x) for x in re.findall(r"-?\d+\.\d{6,}(?:e-?\d+)?", text)}
        assert not found & numbers, event.type
    # log lines: no value of an update
    logged = {float(x) for x in re.findall(r"-?\d+\.\d{6,}(?:e-?\d+)?", caplog.text)}
    assert not logged & numbers
    assert "secure aggregation" in caplog.text  # the coordinator did log the round's stages


def test_central_dp_noises_the_unmasked_sum_of_clipped_deltas(project: Project) -> None:
    """Each client clips its delta to C with weight 1; the noise (std z*C/5) goes on the sum."""
    clip, z = 0.01, 1.0
    config = secure_project(
        project,
        task={"in_features": 2000},
        privacy={
            "mode": "central",
            "clip_norm": clip,
            "noise_multiplier": z,
            "epsilon_budget": 1000.0,
            "sampling": "fixed",
            "population": 5,
            "sample_size": 5,
        },
    )
    (info,) = asyncio.run(run_round(config))
    assert info.status == "committed", info.reason
    events, base, head = recorded(config)
    (charged,) = [e for e in events if e.type == "privacy.charged"]
    assert charged.data["mechanism"] == "central" and charged.data["clip_norm"] == clip
    (unmasked,) = [e for e in events if e.type == "secagg.unmasked"]
    std = z * clip / 5
    assert unmasked.data["noise_std"] == pytest.approx(std)
    assert unmasked.data["total_weight"] == pytest.approx(5.0, abs=1e-5)  # weights 1 each
    updates = plain_updates(config, base, CLIENTS)
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    total = {n: torch.zeros_like(base[n], dtype=torch.float64) for n in names}
    for params in updates.values():
        delta = {n: params[n].double() - base[n].double() for n in names}
        norm = float(sum((d * d).sum() for d in delta.values())) ** 0.5
        assert norm > clip  # the clipping is at work
        for n in names:
            total[n] += delta[n] * (clip / norm)
    residual = torch.cat(
        [(head["weights"][n].double() - base[n].double() - total[n] / 5).reshape(-1) for n in names]
    )
    # what is left is the noise: its std, centred (4002 draws)
    assert abs(residual.std().item() / std - 1) < 0.1
    assert abs(residual.mean().item()) < 5 * std / len(residual) ** 0.5


class _CutBeforeSharing(Runner):
    """A runner whose connection is cut once, just as it sends its share_keys message."""

    relay: Relay
    cut_done = False

    def _secagg_sender(self, api, task, stage_timeout_s):  # noqa: ANN001, ANN202
        send = super()._secagg_sender(api, task, stage_timeout_s)

        async def cut_once(stage: str, payload: bytes):  # noqa: ANN202
            if stage == "share_keys" and not self.cut_done:
                self.cut_done = True
                self.relay.cut()  # the call below fails: the client reconnects and resends
            return await send(stage, payload)

        return cut_once


@pytest.mark.parametrize(("grace", "dropped"), [(10.0, set()), (0.0, {"c3"})])
def test_a_client_whose_connection_drops_at_a_key_stage_is_waited_for_the_rejoin_grace(
    project: Project, grace: float, dropped: set[str]
) -> None:
    """c3's connection is cut as it shares its keys; it reconnects within a second and resends.

    With the grace, the stage waits for it and it stays in; without, the stage closes with the
    four others and c3 is out of the round's secure aggregation.
    """
    config = secure_project(project, rounds={"rejoin_grace_s": grace})
    relays: list[Relay] = []

    def runner_for(cfg: Config, address: str, client_id: str) -> Runner:
        partition = CLIENTS.index(client_id)
        if client_id != "c3":
            return make_runner(cfg, address, client_id, partition=partition)
        relay = Relay(int(address.rsplit(":", 1)[1]))
        relays.append(relay)
        runner = make_runner(
            cfg,
            relay.address,
            client_id,
            partition=partition,
            runner_class=_CutBeforeSharing,
            backoff_cap_s=0.5,
        )
        assert isinstance(runner, _CutBeforeSharing)
        runner.relay = relay
        return runner

    try:
        (info,) = asyncio.run(run_round(config, runner_for=runner_for))
    finally:
        for relay in relays:
            relay.close()
    assert info.status == "committed", info.reason
    assert set(dict(info.secagg.dropped)) == dropped
    assert info.num_clients == 5 - len(dropped)
    if dropped:
        assert dict(info.secagg.dropped)["c3"].startswith("dropped at share_keys")
