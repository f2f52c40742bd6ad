"""The contract between flctl and a project's ``task.py``, and the loader for it.

A task module defines, in plain PyTorch:

- ``build_model(context) -> torch.nn.Module``: the architecture. flctl seeds torch with
  ``context.seed`` before calling it for the initial model (version 1).
- ``client_fn(context) -> flctl.client.Client``: the client a data owner runs. Its ``fit`` may
  call ``context.report_progress(done, total)`` as it goes; the coordinator's panel shows it.
- ``server_evaluate(parameters, context) -> (loss, metrics)`` (optional): evaluation on the
  coordinator's held-out data after each aggregation; its metrics become the round's metrics.

Example:
    ```python
    def build_model(context):
        return torch.nn.Linear(64, 10)

    def client_fn(context):
        return MyClient(context)
    ```
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from flctl.core.errors import TaskError
from flctl.core.usercode import describe_failure

__all__ = ["TaskContext", "load_task", "report_progress_to"]

ConfigValue = bool | int | float | str

#: Where ``TaskContext.report_progress`` sends a fraction, set around each fit by the client.
#: A context variable, not a field: the context is built before the client's runner exists,
#: and one process may run several clients (tests, simulations), each in its own thread.
_progress_sink: ContextVar[Callable[[float], None] | None] = ContextVar(
    "flctl_progress_sink", default=None
)


@dataclass(frozen=True)
class TaskContext:
    """What a task's functions are told about where and how they run.

    Attributes:
        role: "coordinator" or "client".
        seed: The project's seed (data shuffling, initial model).
        device: "cpu", "cuda", "cuda:1", ... (already resolved from "auto").
        client_id: The client's identity ("" on the coordinator).
        partition_id: Which slice of the data this client holds (0-based).
        num_partitions: How many slices the data is split into.
        partitioning: "iid" or "dirichlet".
        alpha: Dirichlet concentration (smaller is more skewed).
        config: The ``[task]`` table of flctl.toml.
    """

    role: str
    seed: int = 0
    device: str = "cpu"
    client_id: str = ""
    partition_id: int = 0
    num_partitions: int = 1
    partitioning: str = "iid"
    alpha: float = 0.5
    config: dict[str, ConfigValue] = field(default_factory=dict)

    def report_progress(self, done: float, total: float) -> None:
        """Say how far the current ``fit`` has got: ``done`` of ``total`` steps.

        Steps are whatever the task counts (epochs, batches, examples). The client sends the
        fraction to the coordinator with its heartbeats, so operators see "training 40%"
        instead of only how long training has lasted. Call it from the thread ``fit`` runs
        in; outside a fit (on the coordinator, in a unit test) it does nothing. A ``total``
        that is not a positive number is ignored.

        Args:
            done: Steps finished so far.
            total: Steps the fit takes in all.

        Example:
            ```python
            def fit(self, parameters, config):
                epochs = int(config["local_epochs"])
                for epoch in range(epochs):
                    train_one_epoch(self.model)
                    self.context.report_progress(epoch + 1, epochs)
            ```
        """
        sink = _progress_sink.get()
        if sink is None or not (math.isfinite(total) and total > 0) or not math.isfinite(done):
            return
        sink(min(1.0, max(0.0, done / total)))


@contextlib.contextmanager
def report_progress_to(sink: Callable[[float], None] | None) -> Iterator[None]:
    """Send the ``report_progress`` calls made in this thread to ``sink`` while the block runs.

    The client wraps each ``fit`` in it; ``sink`` receives the fraction done, 0.0 to 1.0.

    Args:
        sink: Called with each fraction; None drops the reports.
    """
    token = _progress_sink.set(sink)
    try:
        yield
    finally:
        _progress_sink.reset(token)


def load_task(path: Path) -> ModuleType:
    """Import a project's task module from its file.

    Raises:
        TaskError: The file is missing, fails to import, or lacks ``build_model``/``client_fn``.
    """
    if not path.is_file():
        raise TaskError(f"task module not found: {path}")
    name = f"flctl_task_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"cannot import task module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # user code: report it as a task error, with its own traceback
        del sys.modules[name]
        failure = describe_failure(exc, "importing the task")
        raise TaskError(
            f"{path}: {failure.reason}", details={"traceback": failure.traceback}
        ) from exc
    for required in ("build_model", "client_fn"):
        if not callable(getattr(module, required, None)):
            del sys.modules[name]
            raise TaskError(f"{path}: must define a function `{required}`")
    return module
