"""``flctl demo``: the whole journey on one machine, for real.

A fresh project from a template, certificates, a coordinator and N clients as separate
processes on 127.0.0.1 over mutual-TLS gRPC, R rounds of FedAvg, a live panel, a summary. The
project folder is kept for inspection (its state store, logs and certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from flctl.cli._common import admin_client, round_dict
from flctl.cli._init import init_project
from flctl.cli._output import Output
from flctl.cli._rounds import event_from_pb, rounds_exit_code
from flctl.coordinator import read_serve_file
from flctl.core import load_config
from flctl.core.errors import ConfigError, ConnectError, FlctlError
from flctl.security import generate_project_certs
from flctl.transport.grpc import AdminClient
from flctl.tui import DashboardState, event_line, is_notable, render_dashboard

__all__ = ["DemoOptions", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """The options of ``flctl demo``."""

    directory: Path | None = None
    clients: int = 3
    rounds: int = 10
    seed: int = 0
    template: str = "digits"
    json_output: bool = False
    tui: bool | None = None
    threads: int | None = None
    startup_timeout_s: float = 120.0
    variables: dict[str, str] = field(default_factory=dict)


@dataclass
class _Processes:
    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self.files.append(log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "flctl", *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self.running[name] = process
        return process

    def check_alive(self, name: str) -> None:
        process = self.running[name]
        if process.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
            raise FlctlError(
                f"the {name} process exited with status {process.returncode}: "
                + (tail[-1] if tail else "no output"),
                hint=f"see {self.logs / (name + '.log')}",
            )

    def peak_rss_mib(self) -> dict[str, float]:
        """Each running process's peak resident memory so far (VmHWM), in MiB."""
        out: dict[str, float] = {}
        for name, process in self.running.items():
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    out[name] = round(int(line.split()[1]) / 1024, 1)
        return out

    def stop_all(self, timeout: float = 10.0) -> None:
        # Clients first, so the coordinator sees them leave; then the coordinator.
        order = sorted(self.running, key=lambda n: n == "coordinator")
        for name in order:
            process = self.running[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in order:
            process = self.running[name]
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.files:
            log.close()


def _set_key(text: str, table: str, key: str, value: str) -> str:
    pattern = re.compile(rf"(\[{table}\][^\[]*?^{key}\s*=\s*)([^\n#]+)", re.M | re.S)
    if not pattern.search(text):
        raise ConfigError(f"template's flctl.toml has no `{table}.{key}`")
    return pattern.sub(lambda m: m.group(1) + value, text, count=1)


def _prepare(options: DemoOptions, out: Output) -> Path:
    directory = options.directory or Path(f"flctl-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    init_project(
        directory, template=options.template, seed=options.seed, variables=options.variables
    )
    toml = directory / "flctl.toml"
    text = toml.read_text()
    text = _set_key(text, "data", "num_partitions", str(options.clients))
    text = _set_key(text, "rounds", "min_clients", str(options.clients))
    toml.write_text(text)
    load_config(toml)  # fail now, clearly, if the edit broke anything
    ids = [f"c{i}" for i in range(1, options.clients + 1)]
    generate_project_certs(directory / "certs", ids)
    out.note(f"project {directory.resolve()} ({options.template}, {options.clients} clients)")
    return directory.resolve()


async def _wait_serve_file(state_dir: Path, procs: _Processes, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive("coordinator")
        running = read_serve_file(state_dir)
        if running and running.get("address"):
            return str(running["address"])
        await asyncio.sleep(0.1)
    raise ConnectError(f"the coordinator did not start within {timeout:g} s")


async def _wait_clients(
    client: AdminClient,
    count: int,
    procs: _Processes,
    timeout: float,
    on_count: Callable[[int], None],
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in procs.running:
            procs.check_alive(name)
        reply = await client.status([], timeout=10.0)
        on_count(reply.connected_clients)
        if reply.connected_clients >= count:
            return
        await asyncio.sleep(0.2)
    raise ConnectError(f"{count} clients did not connect within {timeout:g} s")


def _stamp() -> str:
    """The time as event lines show it (``HH:MM:SS``, UTC)."""
    return time.strftime("%H:%M:%S", time.gmtime())


def _summary(result: dict[str, Any], wall_s: float, project: Path) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rounds = result["rounds"]
    committed = sum(r["status"] == "committed" for r in rounds)
    last = next((r for r in reversed(rounds) if r["status"] == "committed"), None)
    table.add_row("rounds", f"{committed} of {len(rounds)} committed")
    if last is not None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(last["metrics"].items()))
        table.add_row("final model", f"version {result['model_version']}: {metrics}")
    table.add_row("wall time", f"{wall_s:.1f} s")
    table.add_row("project", str(project))
    table.add_row("state", result["state_dir"])
    table.add_row("logs", str(project / "logs"))
    table.add_row("next", f"cd {project} && flctl models ls")
    style = "green" if committed == len(rounds) else "red"
    return Panel(table, title="flctl demo: done", border_style=style, expand=False)


def run_demo(options: DemoOptions) -> tuple[dict[str, Any], int]:
    """Run the demo; return its JSON document and exit code (0 only if every round committed)."""
    if options.clients < 1 or options.rounds < 1:
        raise ConfigError("--clients and --rounds must be at least 1")
    if options.threads is not None and options.threads < 1:
        raise ConfigError(f"--threads must be at least 1, not {options.threads}")
    out = Output(json_mode=options.json_output)
    use_tui = (out.is_terminal if options.tui is None else options.tui) and not options.json_output
    started = time.monotonic()
    project = _prepare(options, out)
    config = load_config(project / "flctl.toml")
    logs = project / "logs"
    logs.mkdir(exist_ok=True)
    procs = _Processes(logs)
    state = DashboardState(
        title=f"flctl demo ({options.template})",
        state_dir=str(config.state_path),
        total_rounds=options.rounds,
    )

    async def follow(client: AdminClient, ids: list[int], done: asyncio.Event) -> None:
        async for message in client.watch(0):
            event = event_from_pb(message)
            state.apply(event)
            if not use_tui and not options.json_output and is_notable(event):
                out.line(event_line(event))
            if (ids and state.all_done(ids)) or event.type == "coordinator.stopped":
                break
        done.set()

    async def main() -> dict[str, Any]:
        procs.start("coordinator", ["serve", "--address", "127.0.0.1:0", "--no-tui"], project)
        spinner = (
            out.console.status("starting the coordinator (loading torch and the task)")
            if use_tui
            else contextlib.nullcontext()
        )
        with spinner:
            address = await _wait_serve_file(config.state_path, procs, options.startup_timeout_s)
        out.note(f"coordinator on {address}; starting {options.clients} clients")
        state.address = address
        for i in range(1, options.clients + 1):
            process = procs.start(
                f"c{i}",
                [
                    "join",
                    "--server",
                    address,
                    "--client-id",
                    f"c{i}",
                    "--partition",
                    str(i - 1),
                    "--num-partitions",
                    str(options.clients),
                    *(["--threads", str(options.threads)] if options.threads else []),
                ],
                project,
            )
            # A client takes seconds to load torch and its data: show that it is on its way.
            state.expect_client(f"c{i}", time.time())
            if not use_tui and not options.json_output:
                out.line(f"{_stamp()} client c{i} starting (pid {process.pid})")
        client = admin_client(config, address)
        live: Live | None = None
        ids: list[int] = []
        done = asyncio.Event()
        title = state.title
        follower = asyncio.create_task(follow(client, ids, done))
        try:
            if use_tui:
                live = Live(
                    get_renderable=lambda: render_dashboard(state, now=time.time()),
                    console=out.console,
                    refresh_per_second=4,
                )
                live.start()

            def waiting(joined: int) -> None:
                state.title = f"{title}: {joined} of {options.clients} clients joined"

            waiting(0)
            await _wait_clients(client, options.clients, procs, options.startup_timeout_s, waiting)
            state.title = title
            reply = await client.start_round(options.rounds)
            ids.extend(int(i) for i in reply.round_ids)
            while not done.is_set():
                for name in procs.running:
                    if name == "coordinator":
                        procs.check_alive(name)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await done.wait()
                if state.all_done(ids):
                    break
            if live is not None:
                live.stop()
                live = None
            status = await client.status(ids)
            return {
                "rounds": [round_dict(r) for r in status.rounds],
                "model_version": int(status.head_version),
                "state_dir": str(config.state_path),
                "project_dir": str(project),
                "peak_rss_mib": procs.peak_rss_mib(),
            }
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, FlctlError):
                await follower
            if live is not None:
                live.stop()
            await client.close()

    try:
        result = asyncio.run(main())
    finally:
        procs.stop_all()
    wall = time.monotonic() - started
    result["wall_s"] = round(wall, 2)
    if options.json_output:
        out.json(result)
    elif out.is_terminal:
        out.console.print(_summary(result, wall, project))
    else:
        for row in result["rounds"]:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(row["metrics"].items()))
            out.line(f"round {row['round']}: {row['status']} ({metrics})")
        out.line(f"model version {result['model_version']}; state in {result['state_dir']}")
        out.line(f"wall time {wall:.1f} s; project kept in {project}")
    return result, rounds_exit_code(result["rounds"])
