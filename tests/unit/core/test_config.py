from pathlib import Path

import pytest

from flctl.core import DEFAULT_PORT, find_project, load_config, parse_config
from flctl.core.errors import ConfigError, ProjectNotFoundError
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flctl.toml"
    path.write_text(text)
    return path


def test_example_validates_and_documents_every_key() -> None:
    import dataclasses

    from flctl.core import config as cfg

    config = load_config(REPO / "flctl.toml.example")
    assert config.server.address.endswith(f":{DEFAULT_PORT}")
    text = (REPO / "flctl.toml.example").read_text()
    assert config.strategy.name == "fedavg"
    assert "\n[strategy]\n" in text and "\nname = " in text
    for section, cls in cfg._SECTIONS.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} =" in text, f"{section}.{f.name} is not documented"


def test_defaults_when_empty(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.rounds.min_clients == 2
    assert config.state_path == (tmp_path / ".flctl").resolve()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[rounds]\nmin_clients = 'two'\n", "`rounds.min_clients` must be an integer"),
        ("[rounds]\nmin_clients = 0\n", "`rounds.min_clients` must be at least 1"),
        ("[rounds]\nmin_clent = 2\n", "unknown key `rounds.min_clent`"),
        ("[roundz]\n", "unknown table [roundz]"),
        ("[rounds]\nstrategy = 1\n", "`rounds.strategy` must be a string"),
        ("[strategy]\nname = 3\n", "`strategy.name` must be a string"),
        ("[strategy]\nname = ''\n", "`strategy.name` must name a strategy"),
        ("[strategy]\nmu = [0.1]\n", "`strategy.mu` must be a boolean, number or string"),
        ("[strategy]\nmu = inf\n", "`strategy.mu` must be finite"),
        ("strategy = 'fedavg'\n", "[strategy] must be a table"),
        (
            "[rounds]\nstrategy = 'fedavg'\n[strategy]\nname = 'fedprox'\n",
            "`rounds.strategy` ('fedavg') and `strategy.name` ('fedprox') disagree",
        ),
        ("[client]\nupdate_encoding = 'sparse'\n", "`client.update_encoding` must be one of"),
        ("[client]\nupdate_dtype = 'float8'\n", "`client.update_dtype` must be one of"),
        ("[client]\nupdate_dtype = 16\n", "`client.update_dtype` must be one of"),
        ("[client]\ncache_models = 0\n", "`client.cache_models` must be between 1 and"),
        ("[server]\ninsecure = 1\n", "`server.insecure` must be true or false"),
        ("[rounds]\ndeadline_s = nan\n", "`rounds.deadline_s` must be finite"),
        ("[task]\nlr = [1, 2]\n", "`task.lr` must be a boolean, number or string"),
        ("[rounds]\nmin_clients = 3\nclients_per_round = 2\n", "below `rounds.min_clients`"),
        (
            "[rounds]\nclients_per_round = 4\nfraction_per_round = 0.5\n",
            "both select: set one of them",
        ),
        ("[rounds]\nfraction_per_round = 1.5\n", "`rounds.fraction_per_round` must be between"),
        (
            '[rounds]\nover_selection = 2\n[privacy]\nmode = "central"\n'
            "noise_multiplier = 1.0\nepsilon_budget = 10.0\n",
            "`rounds.over_selection` cannot be used with privacy",
        ),
        ("[transport]\nmax_chunk_bytes = 1\n", "`transport.max_chunk_bytes` must be between"),
        ("rounds = 3\n", "[rounds] must be a table"),
        ("this is = not toml = at all\n", "not valid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in info.value.message
    assert str(path) in info.value.message


def test_update_encoding_defaults_lossless_and_accepts_delta_in_half(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).client.update_encoding == "full"
    assert load_config(write(tmp_path, "")).client.update_dtype == "float32"
    config = load_config(
        write(tmp_path, "[client]\nupdate_encoding = 'delta'\nupdate_dtype = 'bfloat16'\n")
    )
    assert (config.client.update_encoding, config.client.update_dtype) == ("delta", "bfloat16")


def test_compression_defaults_to_auto_and_is_checked(tmp_path: Path) -> None:
    transport = load_config(write(tmp_path, "")).transport
    assert (transport.compression, transport.compression_level) == ("auto", 1)
    config = load_config(
        write(tmp_path, "[transport]\ncompression = 'zstd'\ncompression_level = 19\n")
    )
    assert (config.transport.compression, config.transport.compression_level) == ("zstd", 19)
    for text, needle in [
        ("compression = 'gzip'", "`transport.compression` must be one of 'auto', 'zstd', 'none'"),
        ("compression_level = 0", "`transport.compression_level` must be between 1 and 19"),
        ("compression_level = 22", "`transport.compression_level` must be between 1 and 19"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(write(tmp_path, f"[transport]\n{text}\n"))


def test_int_accepted_for_float_and_task_values_kept(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "[rounds]\ndeadline_s = 5\n[task]\nlr = 0.1\nname = 'x'\n")
    )
    assert config.rounds.deadline_s == 5.0 and isinstance(config.rounds.deadline_s, float)
    assert config.task == {"lr": 0.1, "name": "x"}


def test_missing_file_and_find_project(tmp_path: Path) -> None:
    with pytest.raises(ProjectNotFoundError):
        load_config(tmp_path / "flctl.toml")
    with pytest.raises(ProjectNotFoundError):
        find_project(tmp_path)
    write(tmp_path, "")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert find_project(nested) == (tmp_path / "flctl.toml").resolve()


def test_parse_config_root(tmp_path: Path) -> None:
    config = parse_config({"project": {"state_dir": "st"}}, path=tmp_path / "x.toml", root=tmp_path)
    assert config.state_path == (tmp_path / "st").resolve()


def test_gate_is_finite_by_default_and_parsed(tmp_path: Path) -> None:
    from flctl.core import GateConfig

    assert load_config(write(tmp_path, "")).gate == GateConfig()
    # a non-finite aggregate never becomes head unless the gate is turned off
    assert GateConfig().mode == "finite" and GateConfig().rollback_after == 0
    assert load_config(write(tmp_path, "[gate]\nmode = 'off'\n")).gate.mode == "off"
    text = (
        "[gate]\nmode = 'metric'\nmetric = 'loss'\nbetter = 'lower'\nmax_regression = 0.05\n"
        "against = 'head'\nrollback_after = 3\n"
    )
    gate = load_config(write(tmp_path, text)).gate
    assert gate == GateConfig("metric", "loss", "lower", 0.05, "head", 3)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[gate]\nmode = 'strict'\n", "`gate.mode` must be one of"),
        ("[gate]\nbetter = 'max'\n", "`gate.better` must be one of"),
        ("[gate]\nagainst = 'last'\n", "`gate.against` must be one of"),
        ("[gate]\nmax_regression = -0.1\n", "`gate.max_regression` must be at least 0"),
        ("[gate]\nmode = 'metric'\nmetric = ' '\n", "`gate.metric` must name a metric"),
        (
            "[gate]\nmode = 'off'\nrollback_after = 2\n",
            '`gate.rollback_after` (2) needs `gate.mode` "finite"',
        ),
        ("[gate]\nmode = 'finite'\nrollback_after = -1\n", "`gate.rollback_after` must be"),
    ],
)
def test_bad_gate_settings_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in info.value.message


def test_weight_caps_default_to_no_change_and_are_parsed(tmp_path: Path) -> None:
    rounds = load_config(write(tmp_path, "")).rounds
    assert (rounds.max_examples_per_update, rounds.max_weight_share) == (1_000_000_000, 1.0)
    text = "[rounds]\nmax_examples_per_update = 5000\nmax_weight_share = 0.25\n"
    rounds = load_config(write(tmp_path, text)).rounds
    assert (rounds.max_examples_per_update, rounds.max_weight_share) == (5000, 0.25)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "[server]\nheartbeat_interval_s = 30.0\nheartbeat_timeout_s = 30.0\n",
            "`server.heartbeat_timeout_s` (30) must be at least twice "
            "`server.heartbeat_interval_s` (30)",
        ),
        (
            "[server]\nheartbeat_interval_s = 40.0\n",  # above the default timeout (30 s)
            "`server.heartbeat_timeout_s` (30) must be at least twice",
        ),
        ("[rounds]\nmax_weight_share = 0\n", "`rounds.max_weight_share` must be between 0.01"),
        ("[rounds]\nmax_weight_share = 1.5\n", "`rounds.max_weight_share` must be between"),
        (
            "[rounds]\nmax_examples_per_update = 0\n",
            "`rounds.max_examples_per_update` must be between 1 and",
        ),
        (
            f"[rounds]\nmax_examples_per_update = {(1 << 40) + 1}\n",
            "`rounds.max_examples_per_update` must be between 1 and",
        ),
    ],
)
def test_contradicting_session_and_weight_settings_are_refused(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in info.value.message
    assert str(path) in info.value.message


def test_a_heartbeat_timeout_of_two_intervals_is_accepted(tmp_path: Path) -> None:
    text = "[server]\nheartbeat_interval_s = 0.5\nheartbeat_timeout_s = 1.0\n"
    assert load_config(write(tmp_path, text)).server.heartbeat_timeout_s == 1.0


def test_selection_and_quorum_edges_have_a_meaning(tmp_path: Path) -> None:
    """More clients per round than will ever connect selects all; no quorum wait is allowed."""
    text = "[rounds]\nclients_per_round = 10000\nquorum_timeout_s = 0\n"
    rounds = load_config(write(tmp_path, text)).rounds
    assert (rounds.clients_per_round, rounds.quorum_timeout_s) == (10000, 0.0)


def test_strategy_table_name_and_parameters(tmp_path: Path) -> None:
    from flctl.core import StrategyConfig

    assert load_config(write(tmp_path, "")).strategy == StrategyConfig("fedavg", {})
    text = "[strategy]\nname = 'fedprox'\nproximal_mu = 0.1\nlocal = true\n"
    config = load_config(write(tmp_path, text))
    # core keeps the parameters as given; the strategy itself checks them (build_strategy)
    assert config.strategy == StrategyConfig("fedprox", {"proximal_mu": 0.1, "local": True})


def test_strategy_incremental_is_the_coordinators_and_a_boolean(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).strategy.incremental is False
    config = load_config(write(tmp_path, "[strategy]\nname = 'fedadam'\nincremental = true\n"))
    # taken out of the strategy's parameters: FedAdam never sees it
    assert (config.strategy.incremental, config.strategy.params) == (True, {})
    with pytest.raises(ConfigError, match="`strategy.incremental` must be true or false, not 1"):
        load_config(write(tmp_path, "[strategy]\nincremental = 1\n"))


def test_strategy_streaming_is_the_coordinators_a_boolean_and_on_by_default(
    tmp_path: Path,
) -> None:
    assert load_config(write(tmp_path, "")).strategy.streaming is True
    config = load_config(write(tmp_path, "[strategy]\nname = 'fedprox'\nstreaming = false\n"))
    # not one of the strategy's parameters
    assert (config.strategy.streaming, config.strategy.params) == (False, {})
    with pytest.raises(ConfigError, match="`strategy.streaming` must be true or false, not 'no'"):
        load_config(write(tmp_path, "[strategy]\nstreaming = 'no'\n"))


def test_rounds_strategy_is_a_deprecated_alias_of_the_strategy_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(write(tmp_path, "[rounds]\nstrategy = 'fedavgm'\nmin_clients = 3\n"))
    assert config.strategy.name == "fedavgm" and config.rounds.min_clients == 3
    assert "`rounds.strategy` is deprecated" in caplog.text
    both = "[rounds]\nstrategy = 'fedavgm'\n[strategy]\nname = 'fedavgm'\nserver_momentum = 0.9\n"
    config = load_config(write(tmp_path, both))
    assert (config.strategy.name, config.strategy.params) == ("fedavgm", {"server_momentum": 0.9})


def test_rounds_evaluate_modes_and_timeout_are_checked(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, "")).rounds
    assert (default.evaluate, default.evaluate_timeout_s) == ("server", 60.0)
    for mode in ("server", "clients", "both", "none"):
        text = f"[rounds]\nevaluate = '{mode}'\nevaluate_timeout_s = 5\n"
        rounds = load_config(write(tmp_path, text)).rounds
        assert (rounds.evaluate, rounds.evaluate_timeout_s) == (mode, 5.0)
    for text, needle in [
        ("evaluate = 'all'", "`rounds.evaluate` must be one of 'server', 'clients', 'both'"),
        ("evaluate_timeout_s = 0", "`rounds.evaluate_timeout_s` must be between 0.1 and 86400"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(write(tmp_path, f"[rounds]\n{text}\n"))
