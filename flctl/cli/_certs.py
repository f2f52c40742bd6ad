"""``flctl certs``: certificates for mutual TLS."""

from __future__ import annotations

from typing import Annotated

import typer

from flctl.cli._options import ConfigOpt, JsonOpt
from flctl.cli._output import Output, command

__all__ = ["certs_app"]

certs_app = typer.Typer(help="Certificates for mutual TLS.", no_args_is_help=True)


@certs_app.command("gen")
@command()
def certs_gen(
    clients: Annotated[
        int | None, typer.Option(help="Issue client certificates c1..cN (default 3).")
    ] = None,
    client_id: Annotated[
        list[str] | None, typer.Option("--client-id", help="A client identity (repeatable).")
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Extra DNS name or IP for the server certificate."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of issued certificates.")] = 365,
    force: Annotated[bool, typer.Option(help="Regenerate everything, CA included.")] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write the CA, server, admin and client certificates into the project's certs folder."""
    from flctl.cli._common import load_project
    from flctl.core.errors import ConfigError
    from flctl.security import generate_project_certs

    config = load_project(config_path)
    ids = list(client_id or [])
    if clients is not None and clients < 0:
        raise ConfigError(f"--clients must not be negative, not {clients}")
    if not ids or clients is not None:
        ids += [f"c{i}" for i in range(1, (3 if clients is None else clients) + 1)]
    ids = list(dict.fromkeys(ids))
    try:
        report = generate_project_certs(
            config.certs_path, ids, sans=san or [], days=days, force=force
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = Output(json_mode=json_output)
    if json_output:
        out.json(
            {
                "certs_dir": str(report.certs_dir),
                "written": report.written,
                "reused": report.reused,
                "clients": ids,
            }
        )
        return
    out.line(f"certificates in {report.certs_dir}")
    if report.written:
        out.line(f"  written: {', '.join(report.written)}")
    if report.reused:
        out.line(f"  kept:    {', '.join(report.reused)}")
