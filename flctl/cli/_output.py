"""The one place where results and errors meet the user: rich, plain or one JSON document.

- On a terminal: rich panels, and tables in one style (:meth:`Output.table` and
  :meth:`Output.pairs`).
- Piped: plain lines; a table is a header line and one tab-separated line per row, its title
  goes to stderr, so that stdout holds only the table (for ``cut``, ``awk``, ``sort``).
- ``--json``: exactly one JSON document on stdout, errors included
  (``{"error": {"code", "exit_code", "message", ...}}``); human noise goes to stderr.

An ``FlctlError`` exits with its class's exit code; an unexpected exception prints one line and
the path of a log file holding the traceback (``--debug`` prints the traceback instead). A reader
that closes the pipe early (``flctl events | head``) ends the command quietly, with the code a
process that SIGPIPE ended would have.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from flctl.core.errors import FlctlError

__all__ = [
    "BROKEN_PIPE_EXIT_CODE",
    "Output",
    "command",
    "log_dir",
    "quiet_broken_pipe",
    "settings",
    "stdout_is_terminal",
]

#: What shells expect from a command whose reader left: 128 + SIGPIPE, as ``yes | head`` gives.
BROKEN_PIPE_EXIT_CODE = 128 + signal.SIGPIPE

P = ParamSpec("P")
R = TypeVar("R")


class _Settings:
    """Process-wide CLI switches set by the root callback."""

    debug: bool = False
    #: ``--log-format``: ``text`` or ``json`` (log lines and error lines as JSON objects).
    log_format: str = "text"


settings = _Settings()


def log_dir() -> Path:
    """Where tracebacks of unexpected errors go: ``$FLCTL_HOME/logs`` (default ~/.flctl)."""
    home = os.environ.get("FLCTL_HOME") or str(Path.home() / ".flctl")
    return Path(home) / "logs"


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (rich output) rather than a pipe or file (plain lines)."""
    return sys.stdout.isatty()


class Output:
    """Renders one command's results.

    Args:
        json_mode: Print one JSON document on stdout and nothing else there.
    """

    def __init__(self, *, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.is_terminal = stdout_is_terminal() and not json_mode
        self.console = Console(highlight=False, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def json(self, document: Any) -> None:
        """Print ``document`` as the command's one JSON document."""
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def line(self, text: str) -> None:
        """A plain line on stdout (stderr in JSON mode, to keep stdout one document)."""
        if self.json_mode:
            self.err.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[str]],
        *,
        title: str | None = None,
        right: Collection[str] = (),
    ) -> None:
        """Rows under a header: the one table style on a terminal, tab-separated lines piped.

        Args:
            columns: The header, one name per column.
            rows: One cell per column in each row, already formatted.
            title: What the table shows; piped, it goes to stderr.
            right: Columns to right-align on a terminal (numbers).
        """
        if self.is_terminal:
            table = Table(
                title=title,
                title_justify="left",
                title_style="bold",
                header_style="bold",
                box=box.SIMPLE_HEAD,
            )
            for column in columns:
                # fold, never cut: an id or a serial with an ellipsis cannot be copied
                table.add_column(
                    column, justify="right" if column in right else "left", overflow="fold"
                )
            for row in rows:
                # Text, not markup: a cell such as a reason may hold square brackets
                table.add_row(*(Text(cell) for cell in row))
            self.console.print(table)
            return
        if title:
            self.note(title)
        self.line("\t".join(_cell(column) for column in columns))
        for row in rows:
            self.line("\t".join(_cell(cell) for cell in row))

    def pairs(self, rows: Iterable[tuple[str, str]], *, title: str | None = None) -> None:
        """Key / value rows: a two-column table on a terminal, ``key: value`` lines piped.

        Args:
            rows: ``(key, value)`` pairs, already formatted.
            title: What the rows describe; piped, it goes to stderr.
        """
        if self.is_terminal:
            table = Table(
                title=title,
                title_justify="left",
                title_style="bold",
                show_header=False,
                box=box.SIMPLE_HEAD,
            )
            table.add_column(style="bold", overflow="fold")
            table.add_column(overflow="fold")
            for key, value in rows:
                table.add_row(Text(key), Text(value))
            self.console.print(table)
            return
        if title:
            self.note(title)
        for key, value in rows:
            self.line(f"{key}: {value}")

    def note(self, text: str) -> None:
        """A side remark on stderr."""
        self.err.print(text, markup=False, highlight=False)

    def error(self, exc: FlctlError) -> None:
        """Render an error: a panel on a terminal, a line when piped, JSON with --json.

        With ``--log-format json`` (and no ``--json``) it is one JSON log line on stderr, the
        error's JSON object under ``error``.
        """
        if self.json_mode:
            self.json({"error": exc.to_dict()})
            return
        if settings.log_format == "json":
            _json_error_line(exc.message, exc.to_dict())
            return
        trace = exc.details.get("traceback")
        if isinstance(trace, str) and trace:
            # the user's own code failed: its traceback (flctl's frames trimmed) comes first
            self.err.print(trace.rstrip("\n"), markup=False, highlight=False)
        body = Text(exc.message)
        if exc.hint:
            body.append(f"\nhint: {exc.hint}", style="dim")
        if self.err.is_terminal:
            self.err.print(
                Panel(body, title=f"error: {exc.code}", border_style="red", expand=False)
            )
        else:
            self.err.print(f"error: {exc.message}", markup=False, highlight=False)
            if exc.hint:
                self.err.print(f"hint: {exc.hint}", markup=False, highlight=False)


def _json_error_line(message: str, error: dict[str, Any]) -> None:
    """An error as one JSON log line on stderr (``--log-format json``)."""
    from flctl.observe import JsonFormatter

    record = logging.LogRecord("flctl", logging.ERROR, "", 0, message, (), None)
    record.error = error
    sys.stderr.write(JsonFormatter().format(record) + "\n")
    sys.stderr.flush()


def _cell(text: str) -> str:
    """A table cell on one tab-separated line: its own tabs and line breaks become spaces."""
    return " ".join(text.replace("\t", " ").splitlines())


def quiet_broken_pipe() -> None:
    """Point stdout at the null device once its reader has left.

    Python ignores SIGPIPE, so a closed pipe surfaces as ``BrokenPipeError``; the interpreter's
    last flush of stdout would raise it again at exit. Its docs ("Note on SIGPIPE") recommend
    this redirection. Outside a real file descriptor (tests' captured output) nothing is done.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        pass
    finally:
        os.close(devnull)


def _write_traceback(exc: BaseException) -> Path | None:
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"flctl-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text(
            f"flctl {' '.join(sys.argv[1:])}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )
    except OSError:
        return None
    return path


def command(json_param: str | None = "json_output") -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Wrap a typer command so that errors render once, with the right exit code.

    Args:
        json_param: Name of the command's ``--json`` parameter, if it has one.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            json_mode = bool(kwargs.get(json_param)) if json_param else False
            out = Output(json_mode=json_mode)
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except FlctlError as exc:
                out.error(exc)
                raise typer.Exit(exc.exit_code) from None
            except BrokenPipeError:
                # The reader of our output left (`| head`): a normal end, nothing to report.
                quiet_broken_pipe()
                raise typer.Exit(BROKEN_PIPE_EXIT_CODE) from None
            except KeyboardInterrupt:
                out.note("interrupted")
                raise typer.Exit(130) from None
            except Exception as exc:  # the CLI is one of the three places that catch broadly
                if settings.debug:
                    traceback.print_exception(type(exc), exc, exc.__traceback__)
                    raise typer.Exit(1) from None
                path = _write_traceback(exc)
                message = f"unexpected error: {type(exc).__name__}: {exc}"
                where = f" (traceback in {path})" if path else ""
                if json_mode:
                    out.json(
                        {
                            "error": {
                                "code": "internal",
                                "exit_code": 1,
                                "message": message,
                                "log": str(path) if path else None,
                            }
                        }
                    )
                elif settings.log_format == "json":
                    error = {"code": "internal", "exit_code": 1, "message": message}
                    _json_error_line(message, error | {"log": str(path) if path else None})
                else:
                    out.err.print(
                        f"error: {message}{where}; run with --debug to see it",
                        markup=False,
                        highlight=False,
                    )
                raise typer.Exit(1) from None

        return wrapper

    return decorate
