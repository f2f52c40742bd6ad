"""The digits template reports its training progress through ``context.report_progress``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flctl.core import TaskContext, load_task
from flctl.core.task import report_progress_to

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "digits"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> ModuleType:
    return load_task(TEMPLATE / "task.py")


def test_fit_reports_progress_batch_by_batch(task: ModuleType) -> None:
    context = TaskContext(role="client", client_id="c1", partition_id=0, num_partitions=3)
    client = task.client_fn(context)
    torch.manual_seed(0)
    parameters = task.build_model(TaskContext(role="coordinator")).state_dict()
    seen: list[float] = []
    with report_progress_to(seen.append):
        _, num_examples, _ = client.fit(parameters, {"local_epochs": 2, "batch_size": 100})
    assert num_examples == 479
    batches = 2 * 5  # two epochs of ceil(479 / 100) batches
    assert seen == [pytest.approx(done / batches) for done in range(1, batches + 1)]
