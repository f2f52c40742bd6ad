"""The ``flctl`` command tree: thin typer wrappers that parse, call one function, render."""

from __future__ import annotations

import enum
import textwrap
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from flctl import __version__
from flctl.cli._certs import certs_app
from flctl.cli._coordinators import status_command
from flctl.cli._dashboard import dashboard_command
from flctl.cli._dp import dp_app
from flctl.cli._export import export_metrics_command
from flctl.cli._help import use_value_names
from flctl.cli._models import models_app
from flctl.cli._options import ConfigOpt, JsonOpt, ServerOpt
from flctl.cli._output import Output, command, settings
from flctl.cli._simulate import simulate_command
from flctl.cli._status import RoundIdsOpt, clients_app
from flctl.cli._store import store_app
from flctl.cli._strategies import aggregate_command, strategies_app

__all__ = ["app", "main"]

_CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="flctl",
    help="Federated learning from the command line: one coordinator, many clients, one model.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,
)
round_app = typer.Typer(
    help="Start and watch rounds on a running coordinator.", no_args_is_help=True
)
app.add_typer(round_app, name="round", context_settings=_CONTEXT)
# Command groups that live in their own modules (each module imports only typer at the top).
app.add_typer(certs_app, name="certs", context_settings=_CONTEXT)
app.add_typer(dp_app, name="dp", context_settings=_CONTEXT)
app.add_typer(models_app, name="models", context_settings=_CONTEXT)
app.add_typer(clients_app, name="clients", context_settings=_CONTEXT)
app.add_typer(store_app, name="store", context_settings=_CONTEXT)
app.add_typer(strategies_app, name="strategies", context_settings=_CONTEXT)
app.command("aggregate", context_settings=_CONTEXT)(aggregate_command)
app.command("simulate")(simulate_command)
app.command("status")(status_command)
app.command("dashboard")(dashboard_command)


class LogFormat(enum.StrEnum):
    """``--log-format``: how log lines are written on stderr."""

    text = "text"
    json = "json"


def _version(value: bool) -> None:
    if value:
        print(f"flctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            metavar="FORMAT",
            help="Log lines on stderr: text, or json (one JSON object per line: time, level, "
            "logger, message, and the round, client or request it concerns).",
        ),
    ] = LogFormat.text,
) -> None:
    """Federated learning from the command line."""
    settings.debug = debug
    settings.log_format = log_format.value
    if log_format is LogFormat.json:
        import logging

        from flctl.cli._common import setup_logging

        setup_logging(logging.WARNING)  # every command's warnings; serve, join raise the level


# ---------------------------------------------------------------------- demo / init


def _params_variables(params: int | None) -> dict[str, str]:
    from flctl.core.errors import ConfigError

    if params is None:
        return {}
    if params < 1:
        raise ConfigError(f"--params must be positive, not {params}")
    return {"params": str(params)}


@app.command()
@command()
def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Project folder to create (default ./flctl-demo-<time>)."),
    ] = None,
    clients: Annotated[int, typer.Option(help="Number of client processes.")] = 3,
    rounds: Annotated[int, typer.Option(help="Number of FedAvg rounds.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for data shuffling and the initial model.")] = 0,
    template: Annotated[
        str, typer.Option(metavar="NAME", help="Project template: digits or large.")
    ] = "digits",
    params: Annotated[
        int | None, typer.Option(help="Model parameters (large template; default 125M).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads per client process (default client.num_threads, 1)."),
    ] = None,
    json_output: JsonOpt = False,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain lines, no live panel.")] = False,
) -> None:
    """Run a whole federation on this machine.

    A coordinator and clients as processes on 127.0.0.1, over mutual TLS.
    """
    from flctl.cli._demo import DemoOptions, run_demo

    _, code = run_demo(
        DemoOptions(
            directory=directory,
            clients=clients,
            rounds=rounds,
            seed=seed,
            template=template,
            json_output=json_output,
            tui=False if no_tui else None,
            variables=_params_variables(params),
            threads=threads,
        )
    )
    raise typer.Exit(code)


def _init_help() -> str:
    """``init --help``: what it writes, and the templates of the package with their summaries."""
    from flctl.cli._init import available_templates

    lines = []
    for name in available_templates():
        task = resources.files("flctl.templates").joinpath(name, "task.py")
        try:
            # a template's task.py opens with a docstring whose first line says what it is
            summary = task.read_text(encoding="utf-8").split("\n", 1)[0].strip('" ')
        except OSError:
            summary = ""
        lines += textwrap.wrap(
            f"{name:<8}{summary}", width=78, initial_indent="  ", subsequent_indent=" " * 10
        )
    return (
        "Create a project from a template.\n\n"
        "It writes flctl.toml (the configuration), task.py (the model, the data, training and "
        "evaluation), a .gitignore and, where the template has one, a README.md. The folder "
        "must be new or empty (--force overwrites).\n\n"
        "\b\nTemplates (--template NAME):\n" + "\n".join(lines)
    )


@app.command(help=_init_help())
@command()
def init(
    name: Annotated[Path, typer.Argument(help="Folder of the new project.")],
    template: Annotated[
        str, typer.Option(metavar="NAME", help="Template to start from (listed above).")
    ] = "digits",
    force: Annotated[bool, typer.Option(help="Overwrite files in a non-empty folder.")] = False,
    seed: Annotated[int, typer.Option(help="The project's seed.")] = 0,
    params: Annotated[
        int | None, typer.Option(help="Model parameters (large template; default 125M).")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Create a project from a template (its --help lists them)."""
    from flctl.cli._init import init_project

    result = init_project(
        name, template=template, force=force, seed=seed, variables=_params_variables(params)
    )
    out = Output(json_mode=json_output)
    if json_output:
        out.json({"path": str(result.path), "template": result.template, "files": result.files})
        return
    out.line(f"created {result.path} from template {result.template!r}: {', '.join(result.files)}")
    out.line(f"next: cd {name} && flctl certs gen --clients 3 && flctl serve")


# ---------------------------------------------------------------------- serve / join


@app.command()
@command(json_param=None)
def serve(
    address: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="Where to listen (default server.address)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Plaintext instead of mutual TLS (loopback addresses only).")
    ] = False,
    advertise: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="The address clients reach this coordinator at, where it differs from the "
            "listening one (NAT, port mapping); standbys name it (default server.advertise, "
            "else the bound address).",
        ),
    ] = None,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain log lines, no panel.")] = False,
    drain_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="On SIGTERM or Ctrl-C, seconds the running round gets to commit "
            "before it is failed (0: stop at once). A second signal stops at once.",
        ),
    ] = 30.0,
    new_state: Annotated[
        bool,
        typer.Option(
            "--new-state",
            help="Start a new state store although this state folder held one whose database "
            "is lost or damaged (the old database is kept, renamed; blobs stay). Without it, "
            "serve refuses such a folder: restore it with `flctl store restore`.",
        ),
    ] = False,
    metrics_address: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (default "
            'server.metrics_address; "" = off). A loopback address unless '
            "--metrics-allow-remote.",
        ),
    ] = None,
    metrics_allow_remote: Annotated[
        bool,
        typer.Option(
            "--metrics-allow-remote",
            help="Let --metrics-address be a non-loopback address (the endpoint has no TLS "
            "and no login) (default server.metrics_allow_remote).",
        ),
    ] = False,
    config_path: ConfigOpt = None,
) -> None:
    """Run the coordinator until stopped.

    SIGTERM or Ctrl-C drain the running round first; a second signal stops at once.
    """
    from flctl.cli._serve import serve as run_serve

    run_serve(
        config_path=config_path,
        address=address,
        insecure=insecure,
        tui=False if no_tui else None,
        drain_timeout=drain_timeout,
        new_state=new_state,
        advertise=advertise,
        metrics_address=metrics_address,
        metrics_allow_remote=metrics_allow_remote,
    )


@app.command()
@command(json_param=None)
def join(
    client_id: Annotated[
        str, typer.Option(metavar="ID", help="This client's identity (its certificate).")
    ],
    server: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT[,...]",
            help="Coordinator address, or the addresses of coordinators sharing one store: "
            "the client joins the leader and follows a take-over (default: server.address).",
        ),
    ] = None,
    cert: Annotated[Path | None, typer.Option(help="Client certificate (PEM).")] = None,
    key: Annotated[Path | None, typer.Option(help="Client private key (PEM).")] = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate to trust (PEM).")] = None,
    once: Annotated[bool, typer.Option(help="Leave after one round.")] = False,
    partition: Annotated[
        int | None, typer.Option(help="Data partition (default from the id: c1 -> 0).")
    ] = None,
    num_partitions: Annotated[
        int | None, typer.Option(help="Number of partitions (default data.num_partitions).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(metavar="DEVICE", help="auto, cpu or cuda[:N].")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads for training.")] = None,
    task: Annotated[Path | None, typer.Option(help="Task module (default project.task).")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext (loopback only).")] = False,
    replace: Annotated[
        bool,
        typer.Option(
            help="Take over this client id's live session from another flctl join "
            "(without it, a second process is refused, exit 36)."
        ),
    ] = False,
    connect_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Give up (exit 31) when no coordinator answers for this long "
            "(default: keep trying).",
        ),
    ] = None,
    config_path: ConfigOpt = None,
) -> None:
    """Join a coordinator and train each round.

    Trains on local data in each round it is selected for, until stopped.
    """
    from flctl.cli._join import JoinArgs
    from flctl.cli._join import join as run_join

    run_join(
        JoinArgs(
            server=server,
            client_id=client_id,
            config_path=config_path,
            task_path=task,
            cert=cert,
            key=key,
            ca=ca,
            insecure=insecure,
            once=once,
            partition=partition,
            num_partitions=num_partitions,
            device=device,
            threads=threads,
            replace=replace,
            connect_timeout=connect_timeout,
        )
    )


# ---------------------------------------------------------------------- rounds


@round_app.command("start")
@command()
def round_start(
    rounds: Annotated[int, typer.Option(help="How many rounds to queue.")] = 1,
    wait: Annotated[bool, typer.Option(help="Block until the rounds end.")] = False,
    reconnect_timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", help="With --wait: how long to wait for a coordinator that left."
        ),
    ] = 60.0,
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Queue rounds on the running coordinator.

    Needs the admin certificate. Without --wait it prints the rounds it queued; with it, their
    outcome.
    """
    from flctl.cli._common import load_project
    from flctl.cli._rounds import rounds_exit_code, start_rounds

    result = start_rounds(
        load_project(config_path),
        rounds=rounds,
        wait=wait,
        json_output=json_output,
        server=server,
        reconnect_timeout=reconnect_timeout,
    )
    raise typer.Exit(rounds_exit_code(result.get("rounds", [])))


@round_app.command("status")
@command()
def round_status(
    round_ids: RoundIdsOpt = None,
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show rounds, the head version and connected clients.

    Each round with its status, metrics and reason; for the round in training, each selected
    client's state and what happens at the deadline.
    """
    from flctl.cli._status import round_status as show

    show(server=server, config_path=config_path, round_ids=round_ids or [], json_output=json_output)


@round_app.command("cancel")
@command()
def round_cancel(
    round_ids: Annotated[
        list[int] | None, typer.Argument(help="Rounds to cancel (default: the running one).")
    ] = None,
    queued: Annotated[bool, typer.Option(help="Also cancel every queued round.")] = False,
    reason: Annotated[str, typer.Option(help="Why, recorded with the rounds.")] = "",
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Cancel the running round and/or queued rounds.

    The running round can be cancelled until it aggregates.
    """
    from flctl.cli._status import round_cancel as cancel

    cancel(
        server=server,
        config_path=config_path,
        round_ids=round_ids or [],
        queued=queued,
        reason=reason,
        json_output=json_output,
    )


@round_app.command("watch")
@command()
def round_watch(
    follow: Annotated[
        bool | None,
        typer.Option(
            "--follow/--no-follow",
            help="Keep following new events until Ctrl-C, or replay them and exit "
            "(default: follow on a terminal, replay and exit when piped).",
            show_default=False,
        ),
    ] = None,
    since: Annotated[int, typer.Option(metavar="SEQ", help="Replay events after this seq.")] = 0,
    server: ServerOpt = None,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a running coordinator's live panel.

    It is drawn from the coordinator's persisted event log. On a terminal it follows new events
    until Ctrl-C; piped, it replays the log and exits (--follow or --no-follow choose).
    """
    from flctl.cli._common import load_project
    from flctl.cli._rounds import watch_events

    watch_events(
        load_project(config_path),
        server=server,
        follow=follow,
        json_output=json_output,
        since=since,
    )


# ---------------------------------------------------------------------- events


@app.command("events")
@command()
def events(
    type_filter: Annotated[
        str | None,
        typer.Option(
            "--type",
            metavar="TYPE",
            help="admin (the audit trail), a type (round.committed) or a prefix (round).",
        ),
    ] = None,
    since: Annotated[int, typer.Option(metavar="SEQ", help="Only events after this seq.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many, the newest.")] = 1000,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """List the event log; --type admin is the audit trail.

    Works with or without a running coordinator.
    """
    from flctl.cli._events import list_events

    list_events(
        type_filter=type_filter,
        since=since,
        limit=limit,
        config_path=config_path,
        json_output=json_output,
    )


# ---------------------------------------------------------------------- tracking

app.command("export-metrics")(export_metrics_command)


# Every command's --help names its values (--rounds N), the ones above and those of the groups.
use_value_names(app)


def main() -> None:
    """Entry point of the ``flctl`` console script."""
    app()
