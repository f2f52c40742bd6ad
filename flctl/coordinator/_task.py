"""The coordinator's use of the task module: the initial model and server-side evaluation.

torch is imported here lazily, only when a coordinator actually starts.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from flctl.core import Config, TaskContext
from flctl.core.errors import TaskError
from flctl.core.usercode import describe_failure
from flctl.tensors import load_parameters, save_parameters, spec_of

from ._engine import Evaluator

__all__ = ["coordinator_context", "make_evaluator", "task_model_spec", "write_initial_model"]


def coordinator_context(config: Config) -> TaskContext:
    """The TaskContext the coordinator passes to the task's functions."""
    return TaskContext(
        role="coordinator",
        seed=config.project.seed,
        device="cpu",
        num_partitions=config.data.num_partitions,
        partitioning=config.data.partitioning,
        alpha=config.data.alpha,
        config=dict(config.task),
    )


def write_initial_model(task: ModuleType, config: Config, out: Path) -> None:
    """Build the task's model with the project's seed and write its parameters to ``out``."""
    import torch

    torch.set_num_threads(config.client.num_threads)
    torch.manual_seed(config.project.seed)
    try:
        model = task.build_model(coordinator_context(config))
        state = model.state_dict()
    except Exception as exc:  # user code
        failure = describe_failure(exc, "build_model")
        raise TaskError(failure.reason, details={"traceback": failure.traceback}) from exc
    save_parameters(state, out)


def task_model_spec(task: ModuleType, config: Config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The names, dtypes and shapes of the model the task builds now, without its weights.

    The model is built on PyTorch's meta device (no memory for values, so a 500 MB model costs
    nothing); a model that cannot be built there is built for real.

    Raises:
        TaskError: ``build_model`` raises.
    """
    import torch

    context = coordinator_context(config)
    try:
        with torch.device("meta"):
            state = task.build_model(context).state_dict()
    except Exception:  # user code that needs real tensors (loads weights, reads data)
        torch.set_num_threads(config.client.num_threads)
        try:
            state = task.build_model(context).state_dict()
        except Exception as exc:  # user code
            failure = describe_failure(exc, "build_model")
            raise TaskError(failure.reason, details={"traceback": failure.traceback}) from exc
    return spec_of(state)


def make_evaluator(task: ModuleType, config: Config) -> Evaluator | None:
    """Return ``path -> (loss, metrics)`` from the task's ``server_evaluate``, if it has one."""
    evaluate = getattr(task, "server_evaluate", None)
    if not callable(evaluate):
        return None
    context = coordinator_context(config)

    def evaluator(path: Path) -> tuple[float, dict[str, float]]:
        import torch

        # the thread count write_initial_model sets, also after a restart (same results)
        torch.set_num_threads(config.client.num_threads)
        parameters = load_parameters(path)
        try:
            loss, metrics = evaluate(parameters, context)
        except Exception as exc:  # user code
            failure = describe_failure(exc, "server_evaluate")
            raise TaskError(failure.reason, details={"traceback": failure.traceback}) from exc
        return float(loss), {str(k): float(v) for k, v in dict(metrics).items()}

    return evaluator
