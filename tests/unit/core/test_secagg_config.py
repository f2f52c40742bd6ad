"""``[secagg]``: its keys, their ranges, and what secure aggregation cannot be combined with."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flctl.cli import app
from flctl.coordinator import build_strategy, coordinator_context, task_strategy
from flctl.core import load_config
from flctl.core.config import SecAggConfig
from flctl.core.errors import ConfigError

ON = "[secagg]\nenabled = true\n"
CENTRAL = '[privacy]\nmode = "central"\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flctl.toml"
    path.write_text(text)
    return path


def test_off_by_default_and_parsed(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).secagg == SecAggConfig()
    assert not SecAggConfig().enabled
    text = (
        ON + "threshold = 0.75\nnum_shares = 4\nclip_range = 0.5\nquantization_bits = 16\n"
        "max_weight = 64\nstage_timeout_s = 5\n"
    )
    secagg = load_config(write(tmp_path, text)).secagg
    assert secagg == SecAggConfig(True, 0.75, 4, 0.5, 16, 64.0, 5.0)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[secagg]\nthreshold = 0.5\n", "`secagg.threshold` must be above 0.5 and at most 1"),
        ("[secagg]\nthreshold = 1.01\n", "`secagg.threshold` must be above 0.5 and at most 1"),
        ("[secagg]\nquantization_bits = 33\n", "`secagg.quantization_bits` must be between 1"),
        ("[secagg]\nquantization_bits = 0\n", "`secagg.quantization_bits` must be between 1"),
        ("[secagg]\nclip_range = 0\n", "`secagg.clip_range` must be between"),
        ("[secagg]\nnum_shares = -2\n", "`secagg.num_shares` must be between 0"),
        ("[secagg]\nmax_weight = 0.5\n", "`secagg.max_weight` must be between 1"),
        ("[secagg]\nstage_timeout_s = 0\n", "`secagg.stage_timeout_s` must be between"),
        ("[secagg]\nenabled = 1\n", "`secagg.enabled` must be true or false"),
        ("[secagg]\nshares = 3\n", "unknown key `secagg.shares`"),
        (
            ON + "[rounds]\nmin_clients = 1\n",
            "`rounds.min_clients` (1) must be at least 2 with secure aggregation",
        ),
        (
            ON + '[strategy]\nexclude_outliers = "flag"\n',
            'exclude_outliers = "flag"` cannot be combined with secure aggregation',
        ),
        (
            ON + '[privacy]\nmode = "local"\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n',
            '`privacy.mode = "local"` cannot be combined with secure aggregation',
        ),
        (
            ON + CENTRAL + "adaptive_clip = true\n",
            "`privacy.adaptive_clip` cannot be combined with secure aggregation",
        ),
        (
            ON + "[rounds]\nmax_weight_share = 0.5\n",
            "`rounds.max_weight_share` (0.5) cannot be combined with secure aggregation",
        ),
    ],
)
def test_bad_values_and_combinations_are_refused_naming_the_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in info.value.message
    assert str(path) in info.value.message


def test_what_needs_no_individual_update_is_accepted(tmp_path: Path) -> None:
    # central DP adds its noise to the unmasked sum; flagging outliers is off
    config = load_config(write(tmp_path, ON + CENTRAL))
    assert config.secagg.enabled and config.privacy.mode == "central"
    # the same settings that are refused with SecAgg are fine without it
    load_config(write(tmp_path, '[strategy]\nexclude_outliers = "flag"\n'))


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_strategies_that_need_each_update_are_refused_saying_why(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, ON + f'[strategy]\nname = "{name}"\n')
    with pytest.raises(ConfigError) as info:
        build_strategy(load_config(path), path)
    assert f'[strategy] name = "{name}" cannot be combined with [secagg]' in info.value.message
    assert "only their sum" in info.value.message
    assert "fedavg" in (info.value.hint or "")
    # and through the CLI's project loader: exit 10, the message, nothing written
    result = CliRunner().invoke(app, ["models", "ls", "--config", str(path)])
    assert result.exit_code == 10
    assert "cannot be combined with [secagg]" in result.output
    assert not (tmp_path / ".flctl").exists()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_mean_based_strategies_run_with_secure_aggregation(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, ON + f'[strategy]\nname = "{name}"\n')
    assert build_strategy(load_config(path), path).name == name


def test_a_task_strategy_that_is_not_mean_based_is_refused(tmp_path: Path) -> None:
    import types

    from flctl.aggregation import Krum

    path = write(tmp_path, ON)
    config = load_config(path)
    task = types.ModuleType("task")
    task.strategy_fn = lambda context: Krum()  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="defines strategy_fn, whose strategy 'krum'"):
        task_strategy(task, config, coordinator_context(config), path)
