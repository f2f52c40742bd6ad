"""``flctl dp epsilon`` and ``flctl dp plan`` through the real command tree."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from typer.testing import CliRunner

from flctl.cli import app

runner = CliRunner()

EPSILON = ["dp", "epsilon", "--noise-multiplier", "1.1", "--rounds", "100", "--delta", "1e-5"]
PLAN = ["dp", "plan", "--epsilon", "8", "--delta", "1e-5", "--rounds", "100"]


def rdp_reference(z: float, q: float, rounds: int, delta: float) -> float:
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


def run_json(args: list[str]) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, [*args, "--json"])
    return result.exit_code, json.loads(result.stdout)  # exactly one JSON document


def test_epsilon_json_is_one_document_that_agrees_with_dp_accounting() -> None:
    code, doc = run_json([*EPSILON, "--sampling-rate", "0.1"])
    assert code == 0
    assert list(doc)[:7] == [
        "epsilon",
        "accountant",
        "noise_multiplier",
        "sampling",
        "sampling_rate",
        "adjacency",
        "rounds",
    ]
    assert doc["accountant"] == "rdp" and doc["sampling"] == "poisson"
    assert (doc["noise_multiplier"], doc["sampling_rate"], doc["rounds"], doc["delta"]) == (
        1.1,
        0.1,
        100,
        1e-5,
    )
    assert doc["epsilon"] == pytest.approx(rdp_reference(1.1, 0.1, 100, 1e-5), rel=1e-12)


def test_epsilon_pld_and_fixed_sampling() -> None:
    code, pld = run_json([*EPSILON, "--sampling-rate", "0.1", "--accountant", "pld"])
    assert code == 0 and pld["accountant"] == "pld"
    code, rdp = run_json([*EPSILON, "--sampling-rate", "0.1"])
    assert isinstance(pld["epsilon"], float) and isinstance(rdp["epsilon"], float)
    assert pld["epsilon"] < rdp["epsilon"]  # PLD is the tighter accountant here
    fixed = ["--sampling", "fixed", "--population", "1000", "--sample-size", "100"]
    code, doc = run_json([*EPSILON, *fixed])
    assert code == 0
    assert doc["sampling"] == "fixed" and doc["adjacency"] == "replace_one"
    assert (doc["population"], doc["sample_size"], doc["sampling_rate"]) == (1000, 100, 0.1)


def test_epsilon_human_output_is_a_short_table() -> None:
    result = runner.invoke(app, [*EPSILON, "--sampling-rate", "0.1"])
    assert result.exit_code == 0
    assert "epsilon: " in result.stdout and "accountant: rdp" in result.stdout


def test_plan_json_meets_the_target() -> None:
    code, doc = run_json([*PLAN, "--sampling-rate", "0.1"])
    assert code == 0
    z, achieved = doc["noise_multiplier"], doc["epsilon"]
    assert isinstance(z, float) and isinstance(achieved, float)
    assert achieved <= 8.0 and doc["target_epsilon"] == 8.0
    assert rdp_reference(z, 0.1, 100, 1e-5) == pytest.approx(achieved, rel=1e-12)
    assert rdp_reference(z * (1 - 2 * float(doc["tolerance"])), 0.1, 100, 1e-5) > 8.0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([*EPSILON, "--sampling-rate", "0"], 10, "--sampling-rate must be in (0, 1]"),
        ([*EPSILON], 10, "--sampling-rate is required"),
        ([*EPSILON, "--sampling-rate", "0.1", "--accountant", "moments"], 10, "--accountant"),
        ([*EPSILON, "--sampling-rate", "0.1", "--sampling", "random"], 10, "--sampling must"),
        (
            [*EPSILON, "--sampling", "fixed", "--population", "10", "--sample-size", "20"],
            10,
            "--population (10) must be at least --sample-size (20)",
        ),
        (
            [*EPSILON, "--sampling", "fixed", "--population", "10", "--sample-size", "2"]
            + ["--accountant", "pld"],
            10,
            "--sampling fixed needs --accountant rdp",
        ),
        (
            ["dp", "epsilon", "--noise-multiplier", "0", "--rounds", "1", "--delta", "1e-5"]
            + ["--sampling-rate", "0.5"],
            10,
            "--noise-multiplier must be greater than 0",
        ),
        ([*EPSILON, "--sampling-rate", "0.1", "--delta", "1"], 10, "--delta must be"),
        ([*PLAN[:-1], "0", "--sampling-rate", "0.1"], 10, "--rounds must be at least 1"),
        (
            ["dp", "plan", "--epsilon", "500", "--delta", "1e-5", "--rounds", "1"]
            + ["--sampling-rate", "0.1"],
            60,
            "met even with noise multiplier",
        ),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(
    args: list[str], code: int, needle: str
) -> None:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code
    error = json.loads(result.stdout)["error"]
    assert needle in error["message"] and error["exit_code"] == code
    plain = runner.invoke(app, args)
    assert plain.exit_code == code
    assert "Traceback" not in plain.output and needle in plain.stderr


def test_missing_required_option_is_a_usage_error() -> None:
    result = runner.invoke(app, ["dp", "epsilon", "--rounds", "10"])
    assert result.exit_code == 2


def test_dp_without_a_command_shows_help() -> None:
    result = runner.invoke(app, ["dp"])
    assert "epsilon" in result.output and "plan" in result.output


def test_budget_reads_the_ledger_without_a_coordinator(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from flctl.privacy import epsilon, rounds_left
    from flctl.store import SqlStore, charge

    (tmp_path / "flctl.toml").write_text(
        '[project]\nname = "p"\n'
        '[privacy]\nmode = "central"\nnoise_multiplier = 1.0\nclip_norm = 1.0\n'
        'target_delta = 1e-5\nepsilon_budget = 10.0\nsampling = "poisson"\nsampling_rate = 0.5\n'
    )
    monkeypatch.chdir(tmp_path)
    code, empty = run_json(["dp", "budget"])
    assert code == 0 and empty["rounds_charged"] == 0
    assert empty["accountants"]["rdp"]["epsilon_spent"] == 0.0  # type: ignore[index]
    with SqlStore.open(tmp_path / ".flctl") as store:
        for r in (1, 2):
            charge(
                store,
                r,
                mechanism="central",
                noise_multiplier=1.0,
                sampling="poisson",
                sampling_rate=0.5,
                clip_norm=1.0,
                epsilon_rdp=epsilon(1.0, r, 1e-5, sampling_rate=0.5),
                delta=1e-5,
            )
    code, doc = run_json(["dp", "budget"])
    assert code == 0
    assert (doc["mode"], doc["delta"], doc["budget"], doc["rounds_charged"]) == (
        "central",
        1e-5,
        10.0,
        2,
    )
    rdp = doc["accountants"]["rdp"]  # type: ignore[index]
    assert rdp["epsilon_spent"] == pytest.approx(epsilon(1.0, 2, 1e-5, sampling_rate=0.5), rel=1e-9)
    assert rdp["remaining"] == pytest.approx(10.0 - rdp["epsilon_spent"])
    assert rdp["rounds_left"] == rounds_left(10.0, 1e-5, 1.0, sampling_rate=0.5, rounds_done=2)
    pld = doc["accountants"]["pld"]  # type: ignore[index]
    assert pld["epsilon_spent"] == pytest.approx(
        epsilon(1.0, 2, 1e-5, sampling_rate=0.5, accountant="pld"), rel=1e-6
    )
    text = runner.invoke(app, ["dp", "budget"])
    assert text.exit_code == 0 and "rdp epsilon spent" in text.stdout


def test_round_start_exit_code_for_budget_refusals() -> None:
    from flctl.cli._rounds import rounds_exit_code

    refused = {"status": "failed", "reason": "privacy budget exhausted: epsilon would reach 3 > 2"}
    other = {"status": "failed", "reason": "the deadline passed with 1 of 2 required updates"}
    ok = {"status": "committed"}
    assert rounds_exit_code([ok, refused]) == 61
    assert rounds_exit_code([refused, refused]) == 61
    assert rounds_exit_code([ok, other, refused]) == 81
    assert rounds_exit_code([ok, ok]) == 0


def test_budget_of_a_local_job_counts_each_client_release(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from flctl.privacy import Accountant, local_round
    from flctl.store import SqlStore, charge

    (tmp_path / "flctl.toml").write_text(
        '[project]\nname = "p"\n'
        '[privacy]\nmode = "local"\nnoise_multiplier = 4.0\nclip_norm = 0.5\n'
        "target_delta = 1e-5\nepsilon_budget = 10.0\n"
    )
    monkeypatch.chdir(tmp_path)
    with SqlStore.open(tmp_path / ".flctl") as store:
        charge(
            store,
            1,
            mechanism="local",
            noise_multiplier=4.0,
            sampling="poisson",
            sampling_rate=1.0,
            clip_norm=0.5,
            epsilon_rdp=1.0,
            delta=1e-5,
        )
    code, doc = run_json(["dp", "budget"])
    assert code == 0
    assert doc["mechanism"] == {
        "noise_multiplier": 4.0,
        "sampling": "none",
        "sampling_rate": 1.0,
        "sensitivity": "2 * clip_norm",
        "clip_norm": 0.5,
    }
    assert doc["enforced_by"] == "rdp"
    acc = Accountant(1e-5, [local_round(4.0)])
    rdp = doc["accountants"]["rdp"]  # type: ignore[index]
    assert rdp["epsilon_spent"] == pytest.approx(acc.epsilon("rdp"), rel=1e-9)
    assert rdp["rounds_left"] == acc.rounds_left(local_round(4.0), 10.0)


def test_budget_shows_the_clip_norm_adaptive_clipping_reached(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from flctl.store import SqlStore, charge

    (tmp_path / "flctl.toml").write_text(
        '[project]\nname = "p"\n'
        '[privacy]\nmode = "central"\nnoise_multiplier = 1.0\nclip_norm = 1.0\n'
        "adaptive_clip = true\nclip_count_stddev = 1.0\n"
        'target_delta = 1e-5\nepsilon_budget = 10.0\nsampling = "poisson"\nsampling_rate = 0.5\n'
    )
    monkeypatch.chdir(tmp_path)
    with SqlStore.open(tmp_path / ".flctl") as store:
        charge(
            store,
            1,
            mechanism="central",
            noise_multiplier=1.0,
            sampling="poisson",
            sampling_rate=0.5,
            clip_norm=1.0,
            epsilon_rdp=1.0,
            delta=1e-5,
            unclipped_fraction=0.9,
            next_clip_norm=0.92,
        )
    code, doc = run_json(["dp", "budget"])
    assert code == 0 and doc["mechanism"]["clip_norm"] == 0.92  # type: ignore[index]
