"""What a task tells its client about privacy, and when the client refuses it."""

from __future__ import annotations

import math

import pytest

from flctl.core.config import PrivacyConfig
from flctl.core.dp import (
    KEY_CLIP_NORM,
    KEY_MODE,
    KEY_NOISE_MULTIPLIER,
    TaskPrivacy,
    split_task,
)

LOCAL = PrivacyConfig(mode="local", clip_norm=0.5, noise_multiplier=2.0, epsilon_budget=1.0)
CENTRAL = PrivacyConfig(mode="central", noise_multiplier=1.0, epsilon_budget=1.0)
OFF = PrivacyConfig()


def test_a_local_coordinator_sends_its_clip_and_noise_and_the_client_takes_them_out() -> None:
    entries = TaskPrivacy.of(LOCAL).task_entries()
    assert entries == {KEY_MODE: "local", KEY_CLIP_NORM: 0.5, KEY_NOISE_MULTIPLIER: 2.0}
    privacy, rest = split_task({"lr": 0.1, "server_round": 3, **entries})
    assert privacy == TaskPrivacy("local", 0.5, 2.0) and privacy.is_local
    assert rest == {"lr": 0.1, "server_round": 3}  # the user's fit never sees them


def test_central_sends_only_its_mode_and_off_sends_nothing() -> None:
    assert TaskPrivacy.of(CENTRAL).task_entries() == {KEY_MODE: "central"}
    assert TaskPrivacy.of(OFF).task_entries() == {}
    assert split_task({"lr": 0.1}) == (TaskPrivacy("off"), {"lr": 0.1})


@pytest.mark.parametrize(
    ("task", "own", "needle"),
    [
        (TaskPrivacy("local", 0.5, 2.0), OFF, None),  # a client without privacy follows
        (TaskPrivacy("off"), OFF, None),
        (TaskPrivacy("central"), OFF, None),
        (TaskPrivacy("local", 0.5, 2.0), LOCAL, None),
        (TaskPrivacy("central"), CENTRAL, None),
        (TaskPrivacy("off"), LOCAL, 'privacy.mode is "local" and the coordinator\'s is "off"'),
        (TaskPrivacy("central"), LOCAL, 'the coordinator\'s is "central"'),
        (TaskPrivacy("local", 0.5, 2.0), CENTRAL, 'the coordinator\'s is "local"'),
        (TaskPrivacy("local", 0.5, 1.0), LOCAL, "below this client's privacy.noise_multiplier"),
        (TaskPrivacy("local", 0.5, 0.0), OFF, "both must be finite and > 0"),
        (TaskPrivacy("local", math.nan, 2.0), OFF, "both must be finite and > 0"),
    ],
)
def test_refusal(task: TaskPrivacy, own: PrivacyConfig, needle: str | None) -> None:
    why = task.refusal(own)
    if needle is None:
        assert why is None
    else:
        assert why is not None and needle in why


def test_a_malformed_local_task_reads_as_unusable_numbers() -> None:
    privacy, _ = split_task({KEY_MODE: "local", KEY_CLIP_NORM: "big", KEY_NOISE_MULTIPLIER: True})
    assert privacy.is_local
    assert math.isnan(privacy.clip_norm) and math.isnan(privacy.noise_multiplier)
    assert privacy.refusal(OFF) is not None
