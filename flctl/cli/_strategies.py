"""``flctl strategies ls`` and ``flctl aggregate``: the built-in strategies, and one offline run.

``aggregate`` runs one aggregation on plain safetensors files through the coordinator's own
code path (:func:`~flctl.aggregation.make_strategy`, :func:`~flctl.aggregation.cap_weights`,
:meth:`Strategy.aggregate`, the state's round trip): to reproduce a round, to try a strategy on
stored updates, or to test a strategy without a federation.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flctl.cli._options import JsonOpt
from flctl.cli._output import Output, command

if TYPE_CHECKING:
    from flctl.aggregation import Param, Strategy

__all__ = ["aggregate_command", "describe_strategies", "strategies_app"]

strategies_app = typer.Typer(
    help="List the built-in strategies and their parameters.",
    no_args_is_help=True,
)

_UPDATE_RE = re.compile(r"^(?P<path>.+?)(?::(?P<n>\d+))?$")


def _param_dict(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "type": type(param.default).__name__,
        "default": param.default,
        "low": param.low,
        "high": param.high,
        "choices": list(param.choices),
        "help": param.help,
    }


def describe_strategies() -> list[dict[str, Any]]:
    """Every built-in strategy with its summary and parameters, as ``strategies ls --json``."""
    from flctl.aggregation import BUILTIN_STRATEGIES

    return [
        {
            "name": name,
            "summary": cls.summary,
            "params": [_param_dict(p) for p in cls.params],
        }
        for name, cls in sorted(BUILTIN_STRATEGIES.items())
    ]


def _span(param: dict[str, Any]) -> str:
    if param["choices"]:
        return " | ".join(param["choices"])
    if param["low"] is None and param["high"] is None:
        return "-"
    low = "-inf" if param["low"] is None else f"{param['low']:g}"
    high = "inf" if param["high"] is None else f"{param['high']:g}"
    return f"[{low}, {high}]"


@strategies_app.command("ls")
@command()
def strategies_ls(json_output: JsonOpt = False) -> None:
    """List the built-in strategies with their parameters, defaults and ranges.

    Pick one with `name = "..."` in flctl.toml's [strategy] table; its parameters go beside it.
    """
    doc = describe_strategies()
    out = Output(json_mode=json_output)
    if json_output:
        out.json({"strategies": doc})
        return
    rows: list[tuple[str, str, str, str, str]] = []
    for strategy in doc:
        rows.append((strategy["name"], "", "", "", strategy["summary"]))
        for p in strategy["params"]:
            default = str(p["default"]).lower() if p["type"] == "bool" else str(p["default"])
            rows.append(("", p["name"], default, _span(p), p["help"]))
    out.table(("strategy", "parameter", "default", "range", "help"), rows, title="strategies")


# ---------------------------------------------------------------------- aggregate


def _setting(text: str) -> tuple[str, Any]:
    """``key=value``: the value read as a TOML value (``0.1``, ``true``, ``"x"``), else a string.

    Raises:
        ConfigError: No ``=``, or an empty key.
    """
    from flctl.core.errors import ConfigError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key, tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw.strip()


def _update_arg(text: str) -> tuple[Path, int]:
    """``FILE[:NUM_EXAMPLES]`` (one example when not given).

    Raises:
        NotFoundError: No such file.
    """
    from flctl.core.errors import NotFoundError

    match = _UPDATE_RE.match(text)
    path, count = (Path(text), 1) if match is None else (Path(match["path"]), int(match["n"] or 1))
    if not path.is_file() and Path(text).is_file():  # a file name that ends in ":digits"
        path, count = Path(text), 1
    if not path.is_file():
        raise NotFoundError(f"--update {text!r}: no such file {str(path)!r}")
    return path, count


def _task_strategy(task: Path) -> Strategy:
    """The strategy ``task``'s ``strategy_fn`` returns, told what the coordinator tells it.

    The context is the coordinator's for the project whose flctl.toml names ``task`` (found
    from the task's folder upwards); for a task file outside a project, a default one.

    Raises:
        TaskError: The task does not import, defines no ``strategy_fn``, or it raises or
            returns no Strategy.
        ConfigError: That project's flctl.toml is invalid.
    """
    from flctl.coordinator import STRATEGY_FN, call_strategy_fn, coordinator_context
    from flctl.core import TaskContext, find_project, load_config, load_task
    from flctl.core.errors import ProjectNotFoundError, TaskError

    module = load_task(task)
    fn = getattr(module, STRATEGY_FN, None)
    if not callable(fn):
        raise TaskError(
            f"{task}: defines no function `{STRATEGY_FN}`",
            hint="--task takes a task.py with strategy_fn(context); for a built-in strategy, "
            "use --strategy NAME",
        )
    context = TaskContext(role="coordinator")
    try:
        config = load_config(find_project(task.resolve().parent))
    except ProjectNotFoundError:
        config = None
    if config is not None and config.task_path.resolve() == task.resolve():
        context = coordinator_context(config)
    return call_strategy_fn(fn, context, task)


def run_aggregate(
    *,
    strategy_name: str | None,
    settings: list[str],
    base: Path,
    updates: list[str],
    out: Path,
    server_round: int = 1,
    state_in: Path | None = None,
    state_out: Path | None = None,
    max_examples_per_update: int = 1_000_000_000,
    max_weight_share: float = 1.0,
    task: Path | None = None,
) -> dict[str, Any]:
    """One aggregation as the coordinator runs it; return what ``aggregate --json`` prints.

    The strategy is the built-in ``strategy_name`` with ``settings``, or the one ``task``'s
    ``strategy_fn`` returns (exactly one of the two).

    Raises:
        ConfigError: An unknown strategy, setting or bad value; a state that does not belong
            to the strategy; neither or both of a strategy name and a task, or settings with
            a task.
        TaskError: The task's ``strategy_fn`` is missing, raises or returns no Strategy.
        NotFoundError: A file is missing.
        AggregationError: The updates do not match the base model (or there are none).
    """
    from flctl.aggregation import WeightedUpdate, cap_weights, make_strategy
    from flctl.core.errors import ConfigError, NotFoundError
    from flctl.tensors import load_parameters, read_spec, save_parameters, sha256_file

    values = dict(_setting(s) for s in settings)
    if (strategy_name is None) == (task is None):
        raise ConfigError(
            "give either --strategy NAME (a built-in) or --task TASK.py (its strategy_fn)"
        )
    strategy: Strategy
    if task is not None:
        if values:
            raise ConfigError(
                "--set gives a built-in strategy its parameters; a task's strategy_fn "
                "reads its settings from context.config (the project's [task] table)"
            )
        if not task.is_file():
            raise NotFoundError(f"--task {str(task)!r}: no such file")
        strategy = _task_strategy(task)
        strategy_name = str(getattr(strategy, "name", type(strategy).__name__))
    else:
        assert strategy_name is not None
        strategy = make_strategy(strategy_name, values)
    if not base.is_file():
        raise NotFoundError(f"--base {str(base)!r}: no such file")
    parsed = [_update_arg(u) for u in updates]
    if not parsed:
        raise ConfigError("give at least one --update FILE[:NUM_EXAMPLES]")
    if state_in is not None:
        if not state_in.is_file():
            raise NotFoundError(f"--state-in {str(state_in)!r}: no such file")
        strategy.load_state_dict(load_parameters(state_in))
    weights = cap_weights(
        [n for _, n in parsed], max_examples=max_examples_per_update, max_share=max_weight_share
    )
    clients = [f"update{i}" for i in range(1, len(parsed) + 1)]
    fit_config = strategy.configure_fit(server_round, clients)
    weighted = [
        WeightedUpdate(path, weight, client)
        for (path, _), weight, client in zip(parsed, weights, clients, strict=True)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        strategy.aggregate(base, weighted, temp)
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    state = strategy.state_dict()
    state_doc: dict[str, Any] | None = None
    if state_out is not None and state:
        state_out.parent.mkdir(parents=True, exist_ok=True)
        save_parameters(state, state_out)
        state_doc = {
            "path": str(state_out),
            "tensors": {name: list(spec.shape) for name, spec in read_spec(state_out).items()},
        }
    return {
        "strategy": strategy_name,
        "params": values,
        "round": server_round,
        "base": str(base),
        "updates": [
            {"path": str(path), "num_examples": claimed, "weight": weight, "client": client}
            for (path, claimed), weight, client in zip(parsed, weights, clients, strict=True)
        ],
        "fit_config": fit_config,
        "out": str(out),
        "digest": sha256_file(out),
        "state_in": None if state_in is None else str(state_in),
        "state_out": state_doc,
        "has_state": bool(state),
    }


@command()
def aggregate_command(
    base: Annotated[Path, typer.Option("--base", help="The round's starting model (safetensors).")],
    update: Annotated[
        list[str],
        typer.Option(
            "--update",
            metavar="FILE[:NUM_EXAMPLES]",
            help="An update (safetensors) and its example count (default 1); repeat it.",
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the new model.")],
    strategy: Annotated[
        str | None,
        typer.Option("--strategy", help="A built-in strategy (`flctl strategies ls`)."),
    ] = None,
    task: Annotated[
        Path | None,
        typer.Option(
            "--task",
            metavar="TASK.py",
            help="Use the strategy this task's strategy_fn returns (instead of --strategy).",
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="A [strategy] parameter (TOML value); repeat it."
        ),
    ] = None,
    server_round: Annotated[
        int, typer.Option("--round", min=1, help="The round number the strategy sees.")
    ] = 1,
    state_in: Annotated[
        Path | None, typer.Option("--state-in", help="Strategy state to start from.")
    ] = None,
    state_out: Annotated[
        Path | None,
        typer.Option("--state-out", help="Write the strategy's state after (when it has one)."),
    ] = None,
    max_examples_per_update: Annotated[
        int, typer.Option(min=1, help="As rounds.max_examples_per_update.")
    ] = 1_000_000_000,
    max_weight_share: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="As rounds.max_weight_share.")
    ] = 1.0,
    json_output: JsonOpt = False,
) -> None:
    """Aggregate updates offline, as the coordinator does.

    Reproduce a round, try a strategy on stored updates, or test one without a federation.
    The strategy is a built-in (--strategy, with --set) or a task.py's strategy_fn (--task).
    """
    doc = run_aggregate(
        strategy_name=strategy,
        settings=settings or [],
        base=base,
        updates=update,
        out=out,
        server_round=server_round,
        state_in=state_in,
        state_out=state_out,
        max_examples_per_update=max_examples_per_update,
        max_weight_share=max_weight_share,
        task=task,
    )
    strategy = doc["strategy"]
    output = Output(json_mode=json_output)
    if json_output:
        output.json(doc)
        return
    output.line(
        f"{strategy}: aggregated {len(doc['updates'])} updates into {out} "
        f"(sha256 {doc['digest'][:12]})"
    )
    if doc["state_out"] is not None:
        output.line(f"strategy state written to {state_out}")
    elif state_out is not None:
        output.line(f"{strategy} keeps no state: {state_out} not written")
