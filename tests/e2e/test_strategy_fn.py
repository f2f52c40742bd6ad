"""task.py's ``strategy_fn`` and the privacy refusals, run as a user runs flctl: a subprocess.

``flctl serve`` refuses a strategy_fn that raises or returns no Strategy (exit 90) and a
robust strategy together with ``[privacy]`` on (exit 10), before it writes anything;
``flctl aggregate --task`` aggregates with the strategy_fn's strategy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flctl.tensors import load_parameters, save_parameters

from .conftest import flctl, one_json

TASK = """
import torch

from flctl.aggregation import FedAvg, Strategy
from flctl.tensors import load_parameters, save_parameters


def build_model(context):
    return torch.nn.Linear(2, 3)


def client_fn(context):
    raise NotImplementedError


class Scaled(Strategy):
    name = "scaled"

    def __init__(self, factor):
        self.factor = factor

    def configure_fit(self, server_round, clients):
        return {c: {"factor": self.factor} for c in clients}

    def aggregate(self, base, updates, out):
        FedAvg().aggregate(base, updates, out)
        save_parameters({k: v * self.factor for k, v in load_parameters(out).items()}, out)


def strategy_fn(context):
    {body}
"""

GOOD = 'return Scaled(float(context.config.get("factor", 10.0)))'


def project(root: Path, body: str = GOOD, toml: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.py").write_text(TASK.replace("{body}", body))
    (root / "flctl.toml").write_text(f'[project]\ntask = "task.py"\n{toml}')
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the project but Python's bytecode cache."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def serve(root: Path) -> tuple[int, str]:
    result = flctl(
        "serve", "--address", "127.0.0.1:0", "--insecure", "--no-tui", cwd=root, timeout=60
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            "raise RuntimeError('no strategy today')",
            [
                "Traceback (most recent call last)",  # the user's, flctl's frames trimmed
                "task.py",
                "strategy_fn raised RuntimeError: no strategy today (task.py:",
            ],
        ),
        ("return FedAvg", ["strategy_fn returned a abc.ABCMeta", "not a flctl.aggregation"]),
    ],
)
def test_serve_refuses_a_bad_strategy_fn_and_writes_nothing(
    tmp_path: Path, body: str, words: list[str]
) -> None:
    root = project(tmp_path / "proj", body)
    (root / ".flctl").mkdir()  # an empty state folder stays empty
    before = snapshot(root)
    code, output = serve(root)
    assert code == 90, output
    for word in words:
        assert word in " ".join(output.split()), output
    assert snapshot(root) == before
    assert not any((root / ".flctl").iterdir())


def test_serve_refuses_privacy_with_a_robust_strategy(tmp_path: Path) -> None:
    toml = (
        '[privacy]\nmode = "local"\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n'
        '[strategy]\nname = "fedmedian"\n'
    )
    root = project(tmp_path / "proj", "return FedAvg()", toml)
    (root / "task.py").write_text(
        (root / "task.py").read_text().replace("def strategy_fn", "def unused")
    )
    before = snapshot(root)
    code, output = serve(root)
    assert code == 10, output
    text = " ".join(output.split())
    assert 'name = "fedmedian" cannot be combined with [privacy] mode = "local"' in text, output
    assert snapshot(root) == before and not (root / ".flctl").exists()


def test_aggregate_with_the_task_strategy_fn(tmp_path: Path) -> None:
    root = project(tmp_path / "proj", toml="[task]\nfactor = 2.0\n")
    base, a, b = (tmp_path / f"{n}.safetensors" for n in ("base", "a", "b"))
    save_parameters({"w": torch.zeros(2, 3)}, base)
    save_parameters({"w": torch.full((2, 3), 1.0)}, a)
    save_parameters({"w": torch.full((2, 3), 4.0)}, b)
    out = tmp_path / "new.safetensors"
    args = ["aggregate", "--task", str(root / "task.py"), "--base", str(base)]
    args += ["--update", f"{a}:30", "--update", f"{b}:10", "-o", str(out), "--json"]
    doc = one_json(flctl(*args, cwd=tmp_path, check=True).stdout)
    # the project's [task] reaches strategy_fn's context: the mean 1.75 times 2
    assert doc["strategy"] == "scaled"
    assert doc["fit_config"] == {"update1": {"factor": 2.0}, "update2": {"factor": 2.0}}
    assert torch.allclose(load_parameters(out)["w"], torch.full((2, 3), 3.5))
    # --task and --strategy are one or the other; --set is for built-ins
    both = flctl(*args, "--strategy", "fedavg", cwd=tmp_path)
    assert (
        both.returncode == 10 and "either --strategy" in one_json(both.stdout)["error"]["message"]
    )
    bad = flctl(*args, "--set", "factor=3", cwd=tmp_path)
    assert bad.returncode == 10 and "--set" in one_json(bad.stdout)["error"]["message"]
