"""The task contract: what ``TaskContext`` offers a task's code."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from flctl.core import TaskContext
from flctl.core.task import report_progress_to


def test_report_progress_outside_a_fit_does_nothing() -> None:
    TaskContext(role="coordinator").report_progress(1, 2)  # no sink: no error, no effect


def test_report_progress_sends_the_fraction_done_to_the_sink() -> None:
    context = TaskContext(role="client", client_id="c1")
    seen: list[float] = []
    with report_progress_to(seen.append):
        context.report_progress(1, 4)
        context.report_progress(3.0, 4)
        context.report_progress(5, 4)  # more than the total: done
        context.report_progress(-1, 4)
    context.report_progress(2, 4)  # after the block: dropped
    assert seen == [0.25, 0.75, 1.0, 0.0]


@pytest.mark.parametrize(
    ("done", "total"), [(1, 0), (1, -3), (1, float("nan")), (float("inf"), 4), (1, float("inf"))]
)
def test_a_meaningless_report_is_ignored(done: float, total: float) -> None:
    seen: list[float] = []
    with report_progress_to(seen.append):
        TaskContext(role="client").report_progress(done, total)
    assert seen == []


def test_each_thread_reports_to_its_own_sink() -> None:
    # Several clients may train in one process; each fit's reports reach its own runner.
    context = TaskContext(role="client")
    seen: dict[str, list[float]] = {"a": [], "b": []}
    ready = threading.Barrier(2)

    def fit(name: str, done: int) -> None:
        with report_progress_to(seen[name].append):
            ready.wait(5)
            context.report_progress(done, 10)
            ready.wait(5)

    threads = [threading.Thread(target=fit, args=(n, d)) for n, d in (("a", 3), ("b", 7))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"a": [0.3], "b": [0.7]}


def test_the_context_stays_a_frozen_dataclass_with_the_same_fields() -> None:
    context = TaskContext(role="client", seed=3, client_id="c1", config={"lr": 0.1})
    assert [f.name for f in dataclasses.fields(TaskContext)] == [
        "role",
        "seed",
        "device",
        "client_id",
        "partition_id",
        "num_partitions",
        "partitioning",
        "alpha",
        "config",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.seed = 4  # type: ignore[misc]
    assert context == TaskContext(role="client", seed=3, client_id="c1", config={"lr": 0.1})
