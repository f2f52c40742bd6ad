"""The ``flctl`` command line: typer commands that parse, call one function, and render."""

from flctl.cli._app import app, main

__all__ = ["app", "main"]
