"""The [privacy] table: each key's type and range, and what the accountant can account for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flctl.core.config import PrivacyConfig, load_config
from flctl.core.errors import ConfigError
from tests.conftest import REPO

CENTRAL = """
[privacy]
mode = "central"
clip_norm = 0.5
noise_multiplier = 1.1
target_delta = 1e-5
epsilon_budget = 8.0
sampling = "poisson"
sampling_rate = 0.2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flctl.toml"
    path.write_text(text)
    return path


def with_keys(base: str, **changes: object) -> str:
    """``base`` with keys of its [privacy] table replaced or added (TOML literals)."""
    lines = [line for line in base.splitlines() if line.split(" =")[0] not in changes]
    lines += [f"{key} = {value}" for key, value in changes.items()]
    return "\n".join(lines) + "\n"


def test_defaults_are_off() -> None:
    assert PrivacyConfig().mode == "off"
    assert load_config(REPO / "flctl.toml.example").privacy == PrivacyConfig()


def test_every_key_is_documented_in_the_example() -> None:
    text = (REPO / "flctl.toml.example").read_text()
    section = text.split("\n[privacy]\n", 1)[1].split("\n[", 1)[0]
    for f in dataclasses.fields(PrivacyConfig):
        assert f"\n{f.name} =" in section, f"privacy.{f.name} is not documented"


def test_central_poisson_loads(tmp_path: Path) -> None:
    p = load_config(write(tmp_path, CENTRAL)).privacy
    assert (p.mode, p.clip_norm, p.noise_multiplier, p.sampling_rate) == ("central", 0.5, 1.1, 0.2)
    assert p.accountant == "rdp"


def test_fixed_with_rdp_and_adaptive_central_load(tmp_path: Path) -> None:
    text = with_keys(CENTRAL, sampling='"fixed"', sample_size=10, population=1000)
    p = load_config(write(tmp_path, text)).privacy
    assert (p.sampling, p.sample_size, p.population) == ("fixed", 10, 1000)
    text = with_keys(CENTRAL, adaptive_clip="true", target_quantile=0.7, clip_learning_rate=0.1)
    assert load_config(write(tmp_path, text)).privacy.adaptive_clip is True


def test_off_ignores_cross_field_rules(tmp_path: Path) -> None:
    text = '[privacy]\nmode = "off"\nsampling = "fixed"\naccountant = "pld"\n'
    assert load_config(write(tmp_path, text)).privacy.sampling == "fixed"


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"mode": '"global"'}, "`privacy.mode` must be one of"),
        ({"noise_multiplier": -1.0}, "`privacy.noise_multiplier` must be at least 0"),
        ({"sampling_rate": 1.5}, "`privacy.sampling_rate` must be between 0 and 1"),
        ({"target_delta": 2.0}, "`privacy.target_delta` must be between 0 and 1"),
        ({"accountant": '"moments"'}, "`privacy.accountant` must be one of"),
        ({"sample_size": 2.5}, "`privacy.sample_size` must be an integer"),
        ({"adaptive_clip": '"yes"'}, "`privacy.adaptive_clip` must be true or false"),
        ({"clip_norm": "inf"}, "`privacy.clip_norm` must be finite"),
        ({"epsilon": 3.0}, "unknown key `privacy.epsilon`"),
        ({"noise_multiplier": 0.0}, "`privacy.noise_multiplier` must be greater than 0"),
        ({"clip_norm": 0.0}, "`privacy.clip_norm` (the clipping norm) must be greater than 0"),
        ({"target_delta": 0.0}, "`privacy.target_delta` must be strictly between 0 and 1"),
        ({"target_delta": 1.0}, "`privacy.target_delta` must be strictly between 0 and 1"),
        ({"epsilon_budget": 0.0}, "`privacy.epsilon_budget` must be greater than 0"),
        ({"sampling_rate": 0.0}, "`privacy.sampling_rate` must be in (0, 1]"),
        (
            {"adaptive_clip": "true", "target_quantile": 1.0},
            "`privacy.target_quantile` must be strictly between 0 and 1",
        ),
        (
            {"adaptive_clip": "true", "clip_learning_rate": 0.0},
            "`privacy.clip_learning_rate` must be greater than 0",
        ),
        (
            {"adaptive_clip": "true", "clip_norm": 0.0},
            "`privacy.clip_norm` (the initial clipping norm) must be greater than 0",
        ),
        (
            {"mode": '"local"', "adaptive_clip": "true"},
            '`privacy.adaptive_clip` is only available with `privacy.mode = "central"`',
        ),
        ({"sampling": '"fixed"'}, "`privacy.sample_size` must be at least 1"),
        (
            {"sampling": '"fixed"', "sample_size": 10, "population": 5},
            "`privacy.population` (5) must be at least `privacy.sample_size` (10)",
        ),
        (
            {"sampling": '"fixed"', "sample_size": 1, "population": 5},
            "`privacy.sample_size` (1) is below `rounds.min_clients` (2)",
        ),
        (
            {"sampling": '"fixed"', "sample_size": 10, "population": 100, "accountant": '"pld"'},
            '`privacy.accountant` must be "rdp" with `privacy.sampling = "fixed"`',
        ),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, changes: dict[str, object], needle: str) -> None:
    path = write(tmp_path, with_keys(CENTRAL, **changes))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in info.value.message
    assert str(path) in info.value.message


def test_local_mode_follows_the_same_rules(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, with_keys(CENTRAL, mode='"local"'))).privacy.mode == "local"
    with pytest.raises(ConfigError, match="noise_multiplier"):
        load_config(write(tmp_path, with_keys(CENTRAL, mode='"local"', noise_multiplier=0)))


def test_fixed_pld_error_has_a_hint(tmp_path: Path) -> None:
    text = with_keys(
        CENTRAL, sampling='"fixed"', sample_size=10, population=100, accountant='"pld"'
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.hint is not None and "rdp" in info.value.hint


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (
            {"clip_count_stddev": 0.5},
            "`privacy.clip_count_stddev` (0.5) must be more than half of "
            "`privacy.noise_multiplier` (1.1)",
        ),
        (
            {"sampling": '"fixed"', "sample_size": 10, "population": 1000},
            "`privacy.clip_count_stddev` (0: the expected clients per round / 20 = 0.5) must be "
            "more than half",
        ),
        ({"sampling_rate": 0.01, "population": 1000}, "expected clients per round / 20 = 0.5"),
        ({"clip_count_stddev": -1.0}, "`privacy.clip_count_stddev` must be at least 0"),
    ],
)
def test_adaptive_clipping_needs_room_for_the_count_noise(
    tmp_path: Path, changes: dict[str, object], needle: str
) -> None:
    text = with_keys(CENTRAL, adaptive_clip="true", **changes)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in info.value.message


def test_adaptive_clipping_with_enough_count_noise_loads(tmp_path: Path) -> None:
    explicit = with_keys(CENTRAL, adaptive_clip="true", clip_count_stddev=0.6)
    assert load_config(write(tmp_path, explicit)).privacy.clip_count_stddev == 0.6
    # 0.2 * 1000 clients / 20 = 10 > 1.1 / 2
    default = with_keys(CENTRAL, adaptive_clip="true", population=1000)
    assert load_config(write(tmp_path, default)).privacy.clip_count_stddev == 0.0
