"""A task's reported progress reaches the client's status, and heartbeats early in steps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from flctl.client import Client, JoinOptions, Runner, _runner


class StillClient(Client):
    def get_parameters(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(2)}

    def fit(self, parameters: Any, config: Any) -> Any:  # pragma: no cover - not called
        return parameters, 1, {}

    def evaluate(self, parameters: Any, config: Any) -> Any:  # pragma: no cover
        return 0.0, 1, {}


def report(runner: Runner, fractions: list[float], *, state: str = "training") -> tuple[int, float]:
    """Feed ``fractions`` to the training sink; return (early heartbeats, progress at the end)."""

    async def main() -> tuple[int, float]:
        runner._set_state("training", 3)
        sink = runner._training_progress(3)
        runner._set_state(state, 3)
        early = 0
        for fraction in fractions:
            runner._status.dirty.clear()
            sink(fraction)
            await asyncio.sleep(0)  # the sink hands the fraction to the loop
            early += runner._status.dirty.is_set()
        return early, runner._status.progress

    return asyncio.run(main())


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    options = JoinOptions(server="127.0.0.1:1", client_id="c1", cache_dir=tmp_path / "cache")
    return Runner(StillClient(), options)


def test_each_step_of_ten_percent_heartbeats_at_once_when_spaced(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_runner, "_PROGRESS_HEARTBEAT_GAP_S", 0.0)
    early, progress = report(runner, [i / 60 for i in range(1, 61)])
    assert (early, progress) == (10, 1.0)


def test_a_fast_fit_sends_no_burst_of_heartbeats(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A digits fit takes a fraction of a second: its 60 reports wait for the next heartbeat.
    monkeypatch.setattr(_runner, "_PROGRESS_HEARTBEAT_GAP_S", 3600.0)
    early, progress = report(runner, [i / 60 for i in range(1, 61)])
    assert (early, progress) == (0, 1.0)


def test_a_report_after_training_ended_is_dropped(runner: Runner) -> None:
    early, progress = report(runner, [0.5, 1.0], state="uploading")
    assert (early, progress) == (0, 0.0)
