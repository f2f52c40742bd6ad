"""Options shared by many commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["ConfigOpt", "JsonOpt", "ServerOpt"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", metavar="PATH", help="Path of flctl.toml (default: nearest one upwards)."
    ),
]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        metavar="HOST:PORT[,...]",
        help="The coordinator's address, or several sharing one store (the one that leads is "
        "used) (default: the project's .flctl/serve.json).",
    ),
]
