"""`[strategy] exclude_outliers` and `outlier_threshold`: the coordinator's, not the strategy's."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from flctl.core import StrategyConfig, load_config
from flctl.core.config import OUTLIER_MODES
from flctl.core.errors import ConfigError
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flctl.toml"
    path.write_text(text)
    return path


def test_defaults_are_off_and_3_5() -> None:
    strategy = load_config(REPO / "flctl.toml.example").strategy
    assert (strategy.exclude_outliers, strategy.outlier_threshold) == ("off", 3.5)
    assert StrategyConfig().exclude_outliers == "off"
    assert OUTLIER_MODES == get_args(get_type_hints(StrategyConfig)["exclude_outliers"])


def test_the_rule_and_the_config_share_their_default() -> None:
    from flctl.aggregation._outliers import DEFAULT_THRESHOLD

    assert StrategyConfig().outlier_threshold == DEFAULT_THRESHOLD


@pytest.mark.parametrize("mode", ["off", "flag", "drop"])
def test_the_keys_are_taken_out_of_the_strategys_parameters(tmp_path: Path, mode: str) -> None:
    threshold = "" if mode == "off" else "outlier_threshold = 5\n"
    text = f"[strategy]\nname = 'fedprox'\nproximal_mu = 0.1\nexclude_outliers = '{mode}'\n"
    config = load_config(write(tmp_path, text + threshold))
    assert config.strategy.params == {"proximal_mu": 0.1}
    assert config.strategy.exclude_outliers == mode
    assert config.strategy.outlier_threshold == (3.5 if mode == "off" else 5.0)
    assert isinstance(config.strategy.outlier_threshold, float)


def test_the_strategy_never_sees_them(tmp_path: Path) -> None:
    from flctl.coordinator import build_strategy

    text = "[strategy]\nname = 'fedmedian'\nexclude_outliers = 'drop'\noutlier_threshold = 4.0\n"
    path = write(tmp_path, text)
    strategy = build_strategy(load_config(path), path)  # fedmedian takes no parameters
    assert strategy.name == "fedmedian"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("exclude_outliers = 'yes'\n", "`strategy.exclude_outliers` must be one of 'off', "),
        ("exclude_outliers = true\n", "`strategy.exclude_outliers` must be one of"),
        (
            "exclude_outliers = 'flag'\noutlier_threshold = 'high'\n",
            "`strategy.outlier_threshold` must be a number",
        ),
        (
            "exclude_outliers = 'flag'\noutlier_threshold = 0\n",
            "`strategy.outlier_threshold` must be greater than 0, not 0.0",
        ),
        (
            "exclude_outliers = 'drop'\noutlier_threshold = -1.5\n",
            "`strategy.outlier_threshold` must be greater than 0",
        ),
        ("exclude_outliers = 'flag'\noutlier_threshold = inf\n", "must be finite"),
        (
            "outlier_threshold = 3\n",
            '`strategy.outlier_threshold` (3) needs `strategy.exclude_outliers` "flag" or "drop"',
        ),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[strategy]\n" + text))
    assert needle in info.value.message
    assert str(tmp_path / "flctl.toml") in info.value.message


@pytest.mark.parametrize("privacy", ["central", "local"])
def test_dropping_is_refused_under_privacy(tmp_path: Path, privacy: str) -> None:
    dp = (
        f"[privacy]\nmode = '{privacy}'\nnoise_multiplier = 1.0\nclip_norm = 1.0\n"
        "epsilon_budget = 10.0\nsampling = 'poisson'\nsampling_rate = 1.0\n"
    )
    with pytest.raises(ConfigError, match="cannot be combined with `privacy.mode"):
        load_config(write(tmp_path, dp + "[strategy]\nexclude_outliers = 'drop'\n"))
    flagged = load_config(write(tmp_path, dp + "[strategy]\nexclude_outliers = 'flag'\n"))
    assert flagged.strategy.exclude_outliers == "flag"
