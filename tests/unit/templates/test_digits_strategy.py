"""The digits template's commented strategy_fn example: off by default, and it works."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from flctl.aggregation import Strategy, WeightedUpdate
from flctl.coordinator import STRATEGY_FN
from flctl.core import TaskContext, load_task
from flctl.tensors import load_parameters, save_parameters

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "digits"
MARKER = "# Your own strategy (optional)"


@pytest.fixture(scope="module")
def task() -> ModuleType:
    return load_task(TEMPLATE / "task.py")


def example_source() -> str:
    """The commented example after the section header, uncommented."""
    text = (TEMPLATE / "task.py").read_text()
    tail = text[text.index(MARKER) :].splitlines()
    code = [line for line in tail if line.startswith("# ") or line == "#"]
    start = next(i for i, line in enumerate(code) if line.startswith("# from flctl"))
    return "\n".join(line[2:] for line in code[start:]) + "\n"


def test_the_template_defines_no_strategy_fn(task: ModuleType) -> None:
    # [strategy] (fedavg) stays in charge: the template trains as it always did
    assert not hasattr(task, STRATEGY_FN)


def test_the_commented_example_is_a_working_server_lr_fedavg(
    task: ModuleType, tmp_path: Path
) -> None:
    namespace = dict(vars(task))
    exec(compile(example_source(), "task.py", "exec"), namespace)
    context = TaskContext(role="coordinator", config={"server_lr": 0.5})
    strategy = namespace[STRATEGY_FN](context)
    assert isinstance(strategy, Strategy)
    base, a, b = (tmp_path / f"{n}.safetensors" for n in ("base", "a", "b"))
    save_parameters({"w": torch.zeros(3), "n": torch.tensor([2])}, base)
    save_parameters({"w": torch.full((3,), 1.0), "n": torch.tensor([2])}, a)
    save_parameters({"w": torch.full((3,), 4.0), "n": torch.tensor([2])}, b)
    out = tmp_path / "out.safetensors"
    strategy.aggregate(base, [WeightedUpdate(a, 3), WeightedUpdate(b, 1)], out)
    new = load_parameters(out)
    assert torch.allclose(new["w"], torch.full((3,), 0.5 * 1.75))  # half the step to the mean
    assert new["n"].dtype == torch.int64
