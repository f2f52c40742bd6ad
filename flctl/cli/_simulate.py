"""``flctl simulate``: N virtual clients from the project's task.py (docs/simulation.md).

Progress as for ``round start --wait``: a live bar on a terminal (rounds done, the last round's
metrics), one line per round when piped, one JSON document (the report) with ``--json``.
Ctrl-C stops the run (the open round ends as on a stopped coordinator); ``--resume`` finishes
it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated, Any

import typer

from flctl.cli._options import ConfigOpt, JsonOpt
from flctl.cli._output import Output, command

__all__ = ["simulate_command"]


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))


@command()
def simulate_command(
    clients: Annotated[
        int, typer.Option(min=0, help="Virtual clients (client i holds partition i of N).")
    ] = 0,
    rounds: Annotated[int, typer.Option(min=0, help="Rounds to run.")] = 0,
    per_round: Annotated[
        int,
        typer.Option(
            "--per-round", min=0, help="Clients selected per round (default: [rounds] decides)."
        ),
    ] = 0,
    workers: Annotated[
        int,
        typer.Option(min=0, help="Worker processes or Ray actors (default [simulation] workers)."),
    ] = 0,
    backend: Annotated[
        str, typer.Option(metavar="local|ray", help="Where the workers run (default local).")
    ] = "",
    ray_address: Annotated[
        str,
        typer.Option(
            "--ray-address",
            metavar="auto|HOST:PORT",
            help="Join this Ray cluster (default: start a local Ray for the run).",
        ),
    ] = "",
    resume: Annotated[
        bool,
        typer.Option(help="Finish the interrupted simulation, with its clients and rounds."),
    ] = False,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain lines, no live bar.")] = False,
    config_path: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Simulate a federation of virtual clients.

    The same round engine, strategy, privacy, gate, store and events as `serve` + `join`; the
    clients run on a pool of workers (local processes, or Ray actors with --backend ray).
    """
    # imported here: `flctl --help` loads no coordinator, torch or Ray
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from flctl.cli._common import load_project, setup_logging
    from flctl.cli._rounds import rounds_exit_code
    from flctl.observe import RunTracker, start_tracking
    from flctl.simulation import SimulationOptions, SimulationReport, simulate

    if backend and backend not in ("local", "ray"):
        from flctl.core.errors import ConfigError

        raise ConfigError(f"--backend must be 'local' or 'ray', not {backend!r}")
    config = load_project(config_path)
    out = Output(json_mode=json_output)
    use_tui = out.is_terminal and not no_tui
    setup_logging(logging.WARNING)
    options = SimulationOptions(
        clients=clients,
        rounds=rounds,
        per_round=per_round,
        workers=workers,
        backend=backend,
        ray_address=ray_address,
        resume=resume,
    )
    bar = (
        Progress(
            TextColumn("[bold]simulate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=out.console,
            transient=False,
        )
        if use_tui
        else None
    )
    rounds_bar: Any = None
    tracker: RunTracker | None = None
    if resume or (clients and rounds):  # otherwise simulate refuses the options at once
        # [tracking]: a destination it cannot write stops the command here, before any round
        asked = {"clients": clients, "rounds": rounds, "per_round": per_round, "resume": resume}
        tracker = start_tracking(
            config, "simulate", {f"simulate.{k}": v for k, v in asked.items() if v}
        )

    def on_event(kind: str, details: dict[str, Any]) -> None:
        nonlocal rounds_bar
        if kind == "started":
            text = (
                f"{details['clients']} virtual clients on {details['workers']} "
                f"{details['backend']} worker(s), ready in {details['startup_s']:.1f} s"
            )
            if bar is not None:
                bar.console.print(text)
            else:
                out.line(text)
        elif kind == "round":
            line = (
                f"round {details['id']}: {details['status']} in {details['seconds']:.2f} s, "
                f"{details['num_clients']} updates"
                + (f", {_metrics(details['metrics'])}" if details["metrics"] else "")
                + (f" ({details['reason']})" if details["reason"] else "")
            )
            if tracker is not None and details["status"] == "committed":
                tracker.log_round(details["id"], details["metrics"])
            if bar is not None:
                if rounds_bar is None:
                    rounds_bar = bar.add_task("", total=details["total"])
                bar.update(rounds_bar, completed=details["done"], description=line)
            else:
                out.line(line)

    async def run() -> SimulationReport:
        # SIGTERM stops the run as Ctrl-C does: the open round ends, --resume finishes
        main = asyncio.current_task()
        assert main is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        return await simulate(config, options, on_event)

    if bar is not None:
        bar.start()
    ended = "FAILED"
    try:
        report = asyncio.run(run())
        ended = "FINISHED"
    except (asyncio.CancelledError, KeyboardInterrupt):
        ended = "KILLED"
        out.note("interrupted: `flctl simulate --resume` finishes the run")
        raise typer.Exit(130) from None
    finally:
        if bar is not None:
            bar.stop()
        if tracker is not None:  # the head model as the run's artifact; the run ends
            tracker.finish(config, status=ended)
    tracked = tracker.destinations if tracker is not None else {}
    if json_output:
        out.json({**report.to_dict(), **({"tracking": tracked} if tracked else {})})
        code = rounds_exit_code([{"status": r.status, "reason": r.reason} for r in report.rounds])
        if code:
            raise typer.Exit(code)
        return
    done = [r for r in report.rounds if r.status == "committed"]
    out.line(
        f"simulated {len(report.rounds)} round(s) ({len(done)} committed) with "
        f"{report.clients} clients in {report.wall_s:.1f} s; head: version "
        f"{report.head_version} ({report.head_digest[:12]})"
    )
    if "mlflow" in tracked:
        out.line(
            f"tracked in MLflow run {tracked['mlflow']['run_id']} at {tracked['mlflow']['uri']}"
        )
    if "tensorboard" in tracked:
        out.line(f"tracked in TensorBoard: {tracked['tensorboard']['dir']}")
    code = rounds_exit_code([{"status": r.status, "reason": r.reason} for r in report.rounds])
    if code:
        raise typer.Exit(code)
