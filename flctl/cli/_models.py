"""``flctl models ls``: the model history, read straight from the state store."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flctl.cli._options import ConfigOpt, JsonOpt
from flctl.cli._output import Output, command
from flctl.core import Config
from flctl.core.errors import NotFoundError

if TYPE_CHECKING:
    from flctl.store import ModelRecord

__all__ = ["list_models", "model_dict", "models_app"]

models_app = typer.Typer(help="The model history in the state store.", no_args_is_help=True)


def model_dict(record: ModelRecord, head: int | None) -> dict[str, Any]:
    """A model version as the JSON object ``models ls --json`` prints."""
    return {
        "version": record.version,
        "digest": record.digest,
        "parent": record.parent,
        "round": record.server_round,
        "kind": record.kind,
        "metrics": record.metrics,
        "created": record.created,
        "is_head": record.version == head,
    }


def list_models(config: Config, *, limit: int | None, json_output: bool) -> dict[str, Any]:
    """Print the model versions, newest first; works whether or not a coordinator runs."""
    from flctl.store import SqlStore

    out = Output(json_mode=json_output)
    if not (config.state_path / "state.db").is_file():
        raise NotFoundError(
            f"no state store in {config.state_path}",
            hint="start the coordinator once with `flctl serve` to create it",
        )
    store = SqlStore.open(config.state_path)
    try:
        head_record = store.head()
        head = head_record.version if head_record else None
        models = store.list_models(limit=limit)
    finally:
        store.close()
    document = {"models": [model_dict(m, head) for m in models], "head": head}
    if json_output:
        out.json(document)
        return document
    metric_names = sorted({k for m in models for k in m.metrics})[:4]
    if out.is_terminal:
        table = Table(title=f"models in {config.state_path}", title_justify="left")
        for column in ("version", "digest", "parent", "round", "kind", *metric_names, "created"):
            table.add_column(column, justify="right" if column != "kind" else "left")
        for m in models:
            marker = " (head)" if m.version == head else ""
            table.add_row(
                f"{m.version}{marker}",
                m.digest[:12],
                str(m.parent or "-"),
                str(m.server_round or "-"),
                m.kind,
                *[f"{m.metrics[k]:.4f}" if k in m.metrics else "-" for k in metric_names],
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created)),
            )
        out.console.print(table)
    else:
        for m in models:
            metrics = " ".join(f"{k}={m.metrics[k]:.4f}" for k in metric_names if k in m.metrics)
            head_mark = " head" if m.version == head else ""
            out.line(
                f"{m.version}\t{m.digest[:12]}\tparent={m.parent or '-'}\t"
                f"round={m.server_round or '-'}\t{m.kind}{head_mark}\t{metrics}"
            )
    return document


@models_app.command("ls")
@command()
def models_ls(
    limit: Annotated[int | None, typer.Option(help="Show at most this many versions.")] = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List model versions, newest first (works with or without a running coordinator)."""
    from flctl.cli._common import load_project

    list_models(load_project(config_path), limit=limit, json_output=json_output)
