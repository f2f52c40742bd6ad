"""How ``--help`` names the values commands take: ``--rounds N``, ``--config PATH``, ``NAME``.

Typer writes a value's Python type as its placeholder (``<int>``, ``<float range>``,
``<list[str]>``) and a required argument as ``{name}``. flctl's commands name the value instead,
the way man pages and click do. An option's ``metavar=`` wins; without one, the value's type
gives the name (:func:`metavar`). :func:`use_value_names` puts every command of an app on
:class:`NamedValuesCommand`, so a command added later needs nothing to get it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

__all__ = ["NamedValuesCommand", "metavar", "use_value_names"]

#: Placeholders by the value's type (a list's: its items'), for options without ``metavar=``.
_BY_TYPE: dict[Any, str] = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


def metavar(param: Any) -> str:
    """The placeholder ``--help`` shows for a parameter's value.

    Args:
        param: A typer option or argument.

    Returns:
        Its ``metavar`` when it has one; an argument's name in capitals (``NAME``); for an
        option, its choices (``[safetensors|torch]``) or a name for its type (``N``,
        ``NUMBER``, ``PATH``, ``TEXT``).
    """
    if param.metavar is not None:
        return str(param.metavar)
    if isinstance(param, TyperArgument):
        return str(param.name).upper()
    described = getattr(param, "type_descriptor", None)
    if described is None:  # a typer that still shows click's own names (INTEGER, TEXT)
        return str(param.name).upper()
    if described.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in described.choices) + "]"
    if described.is_path:
        return "PATH"
    annotation = described.annotation
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation)
    return _BY_TYPE.get(annotation, str(param.name).upper())


class NamedValuesCommand(TyperCommand):
    """A typer command whose help names values (``--rounds N``) instead of typing them."""

    def get_params(self, ctx: Any) -> list[Any]:
        """The command's parameters, each value-taking one with its placeholder set."""
        params: list[Any] = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument) or (
                isinstance(param, TyperOption) and not param.is_flag and not param.count
            ):
                param.metavar = metavar(param)
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``[OPTIONS] NAME [MORE]...``: click's usage style, without typer's braces."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                piece = metavar(param) if param.required else f"[{metavar(param)}]"
                pieces.append(piece + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The Arguments and Options sections, arguments named only by their placeholder."""
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, TyperArgument):
                name = metavar(param) + ("..." if param.nargs != 1 else "")
                arguments.append((name, record[1]))
            else:
                options.append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)


def use_value_names(app: typer.Typer) -> None:
    """Give every command of ``app`` and of its groups :class:`NamedValuesCommand`'s help.

    Call it once every command is registered; a command with a class of its own keeps it.
    """
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = NamedValuesCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_value_names(group.typer_instance)
