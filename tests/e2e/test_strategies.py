"""``flctl strategies ls`` and ``flctl aggregate``, run as a subprocess."""

from __future__ import annotations

from pathlib import Path

import torch

from flctl.aggregation import BUILTIN_STRATEGIES
from flctl.tensors import load_parameters, save_parameters

from .conftest import flctl, one_json


def test_strategies_ls_lists_every_builtin_with_its_parameters(tmp_path: Path) -> None:
    doc = one_json(flctl("strategies", "ls", "--json", cwd=tmp_path, check=True).stdout)
    by_name = {s["name"]: s for s in doc["strategies"]}
    assert sorted(by_name) == sorted(BUILTIN_STRATEGIES)
    for name, cls in BUILTIN_STRATEGIES.items():
        assert by_name[name]["summary"] == cls.summary
        assert [p["name"] for p in by_name[name]["params"]] == [p.name for p in cls.params]
        for shown, param in zip(by_name[name]["params"], cls.params, strict=True):
            assert (shown["default"], shown["low"], shown["high"]) == (
                param.default,
                param.low,
                param.high,
            )
            assert shown["help"] == param.help and shown["choices"] == list(param.choices)
    assert by_name["fedavg"]["params"] == []
    table = flctl("strategies", "ls", cwd=tmp_path, check=True).stdout
    assert table.splitlines()[0].split("\t") == [
        "strategy",
        "parameter",
        "default",
        "range",
        "help",
    ]
    assert "fedavg\t" in table


def _model(path: Path, value: float) -> Path:
    save_parameters({"w": torch.full((2, 3), value), "b": torch.full((3,), value)}, path)
    return path


def test_aggregate_fedavg_weighs_by_examples(tmp_path: Path) -> None:
    base = _model(tmp_path / "base.safetensors", 0.0)
    a = _model(tmp_path / "a.safetensors", 1.0)
    b = _model(tmp_path / "b.safetensors", 4.0)
    out = tmp_path / "out" / "new.safetensors"
    result = flctl(
        "aggregate",
        "--strategy",
        "fedavg",
        "--base",
        str(base),
        "--update",
        f"{a}:30",
        "--update",
        f"{b}:10",
        "-o",
        str(out),
        "--json",
        cwd=tmp_path,
        check=True,
    )
    doc = one_json(result.stdout)
    assert [(u["num_examples"], u["weight"]) for u in doc["updates"]] == [(30, 30), (10, 10)]
    assert doc["state_out"] is None and not doc["has_state"]
    new = load_parameters(out)
    assert torch.allclose(new["w"], torch.full((2, 3), 1.75))


def test_aggregate_carries_a_strategy_state_from_round_to_round(tmp_path: Path) -> None:
    base = _model(tmp_path / "base.safetensors", 0.0)
    update = _model(tmp_path / "u.safetensors", 1.0)

    def step(round_: int, base: Path, state_in: Path | None) -> dict[str, object]:
        args = ["aggregate", "--strategy", "fedavgm", "--set", "server_momentum=0.9"]
        args += ["--set", "server_learning_rate=1.0", "--round", str(round_)]
        args += ["--base", str(base), "--update", f"{update}:5"]
        args += ["-o", str(tmp_path / f"m{round_}.safetensors")]
        args += ["--state-out", str(tmp_path / f"s{round_}.safetensors"), "--json"]
        if state_in is not None:
            args += ["--state-in", str(state_in)]
        return one_json(flctl(*args, cwd=tmp_path, check=True).stdout)  # type: ignore[no-any-return]

    first = step(1, base, None)
    assert first["has_state"] and first["state_out"] is not None
    second = step(2, tmp_path / "m1.safetensors", tmp_path / "s1.safetensors")
    again = step(2, tmp_path / "m1.safetensors", None)  # without the state: no momentum
    assert second["digest"] != again["digest"]


def test_aggregate_refusals(tmp_path: Path) -> None:
    base = _model(tmp_path / "base.safetensors", 0.0)
    common = ["--base", str(base), "--update", f"{base}:1", "-o", str(tmp_path / "o.st")]
    bad = flctl("aggregate", "--strategy", "fedmagic", *common, "--json", cwd=tmp_path)
    assert bad.returncode == 10 and "unknown strategy" in one_json(bad.stdout)["error"]["message"]
    bad = flctl(
        "aggregate", "--strategy", "fedavgm", "--set", "server_momentum=2", *common, cwd=tmp_path
    )
    assert bad.returncode == 10 and "server_momentum" in bad.stderr
    bad = flctl("aggregate", "--strategy", "fedavg", "--set", "mu=1", *common, cwd=tmp_path)
    assert bad.returncode == 10 and "unknown key" in bad.stderr
    assert not (tmp_path / "o.st").exists()
