"""Plain tasks to and from the wire's Task message."""

from __future__ import annotations

import pytest

from flctl.core.errors import InvalidInputError
from flctl.core.work import Task
from flctl.transport.grpc import pb, task_from_pb, task_to_pb


@pytest.mark.parametrize("kind", ["fit", "evaluate"])
def test_a_task_survives_the_wire(kind: str) -> None:
    task = Task(
        server_round=7,
        task_id="ab12",
        kind=kind,  # type: ignore[arg-type]
        model_digest="cd" * 32,
        model_size=123_456_789_012,
        deadline_unix=1_765_000_000.25,
        config={"lr": 0.05, "local_epochs": 2, "shuffle": True, "name": "x", "server_round": 7},
    )
    message = pb.Task.FromString(task_to_pb(task).SerializeToString())
    back = task_from_pb(message)
    assert back == task
    # the config keeps each value's type: 2 stays an int, True a bool
    assert {k: type(v) for k, v in back.config.items()} == {
        k: type(v) for k, v in task.config.items()
    }


def test_an_unknown_kind_is_refused_and_none_means_fit() -> None:
    assert task_from_pb(pb.Task(task_id="t")).kind == "fit"
    with pytest.raises(InvalidInputError, match="unknown task kind 'train'"):
        task_from_pb(pb.Task(task_id="t", kind="train"))
