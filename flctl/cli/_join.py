"""``flctl join``: serve rounds as one client until stopped, refused, or (``--once``) done."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from flctl.cli._common import setup_logging
from flctl.cli._output import Output
from flctl.client import Client, JoinOptions, Runner, resolve_device
from flctl.core import Config, TaskContext, find_project, load_config, load_task
from flctl.core.errors import ConfigError, ProjectNotFoundError, TaskError
from flctl.core.usercode import describe_failure
from flctl.security import load_credentials, load_pem_files

__all__ = ["JoinArgs", "join"]


@dataclass(frozen=True)
class JoinArgs:
    """The options of ``flctl join``."""

    server: str | None
    client_id: str
    config_path: Path | None = None
    task_path: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    insecure: bool = False
    once: bool = False
    partition: int | None = None
    num_partitions: int | None = None
    device: str | None = None
    threads: int | None = None
    replace: bool = False
    connect_timeout: float | None = None


def default_partition(client_id: str, num_partitions: int) -> int:
    """``c1`` holds partition 0, ``c2`` partition 1, ...; ids without a number hold 0."""
    match = re.search(r"(\d+)$", client_id)
    return (int(match.group(1)) - 1) % num_partitions if match and int(match.group(1)) else 0


def _config(args: JoinArgs) -> tuple[Config, Path | None]:
    """The project's configuration and its flctl.toml (None: a bare ``--task``, defaults)."""
    if args.config_path is not None:
        return load_config(args.config_path), args.config_path
    try:
        path = find_project()
        return load_config(path), path
    except ProjectNotFoundError:
        if args.task_path is None:
            raise
        return Config(root=args.task_path.resolve().parent), None


def server_address(args: JoinArgs, config: Config, config_file: Path | None) -> tuple[str, str]:
    """Where to join: ``--server``, else the project's ``server.address``; and whence it came."""
    if args.server:
        return args.server, "--server"
    where = f"server.address in {config_file}" if config_file else "the default server.address"
    return config.server.address, where


def build_client(args: JoinArgs, config: Config) -> tuple[Client, TaskContext]:
    """Load the task and build its client for this identity and data partition."""
    import torch

    num_partitions = args.num_partitions or config.data.num_partitions
    partition = (
        args.partition
        if args.partition is not None
        else default_partition(args.client_id, num_partitions)
    )
    if not 0 <= partition < num_partitions:
        raise ConfigError(f"--partition {partition} is outside 0..{num_partitions - 1}")
    threads = args.threads or config.client.num_threads
    torch.set_num_threads(threads)
    try:
        device = resolve_device(args.device or config.client.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    task = load_task(args.task_path or config.task_path)
    context = TaskContext(
        role="client",
        seed=config.project.seed,
        device=device,
        client_id=args.client_id,
        partition_id=partition,
        num_partitions=num_partitions,
        partitioning=config.data.partitioning,
        alpha=config.data.alpha,
        config=dict(config.task),
    )
    try:
        client = task.client_fn(context)
    except Exception as exc:  # user code
        failure = describe_failure(exc, "client_fn")
        raise TaskError(failure.reason, details={"traceback": failure.traceback}) from exc
    if not isinstance(client, Client):
        raise TaskError(f"client_fn returned a {type(client).__name__}, not a flctl Client")
    return client, context


def join(args: JoinArgs) -> int:
    """Join the coordinator and serve rounds; return the number of rounds served."""
    from flctl.core._memory import return_large_buffers

    return_large_buffers()
    setup_logging()
    out = Output()
    config, config_file = _config(args)
    server, source = server_address(args, config, config_file)
    if source != "--server":
        out.line(f"joining {server} ({source}; --server HOST:PORT to change)")
    if args.insecure:
        cert = key = ca = b""
    elif args.cert or args.key or args.ca:
        if not (args.cert and args.key and args.ca):
            raise ConfigError("--cert, --key and --ca go together")
        cert, key, ca = load_pem_files(args.cert, args.key, args.ca)
    else:
        cert, key, ca = load_credentials(config.certs_path, args.client_id)
    client, context = build_client(args, config)
    if args.connect_timeout is not None and args.connect_timeout <= 0:
        raise ConfigError(f"--connect-timeout must be positive, not {args.connect_timeout:g}")
    options = JoinOptions(
        server=server,
        client_id=args.client_id,
        cert_pem=cert,
        key_pem=key,
        ca_pem=ca,
        insecure=args.insecure,
        cache_dir=config.client_cache_path / args.client_id,
        cache_models=config.client.cache_models,
        once=args.once,
        update_encoding=config.client.update_encoding,
        update_dtype=config.client.update_dtype,
        privacy=config.privacy,
        replace=args.replace,
        give_up_after_s=args.connect_timeout,
    )

    progress = _TransferProgress(out) if out.is_terminal else None

    def on_event(kind: str, details: dict[str, Any]) -> None:
        if kind == "transfer":
            if progress is not None:
                progress.update(details)
            elif details["done"] == details["total"]:
                arrow = "downloaded" if details["direction"] == "down" else "uploaded"
                out.line(
                    f"{time.strftime('%H:%M:%S')} round {details['server_round']}: "
                    f"{arrow} {details['total'] / (1 << 20):.1f} MiB"
                )
            return
        stamp = time.strftime("%H:%M:%S")
        if kind == "joined":
            text = (
                f"joined {details['server']} as {details['client_id']} "
                f"(partition {context.partition_id} of {context.num_partitions}, {context.device})"
            )
        elif kind == "round":
            text = f"round {details['server_round']}: training"
        elif kind == "cached":
            text = f"round {details['server_round']}: model {details['digest'][:12]} in cache"
        elif kind == "download_resumed":
            text = (
                f"round {details['server_round']}: resuming the download of model "
                f"{details['digest'][:12]} from byte {details['offset']}"
            )
        elif kind == "uploaded":
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(details["metrics"].items()))
            text = (
                f"round {details['server_round']}: update accepted "
                f"({details['num_examples']} examples, {details['size']} bytes, "
                f"{details['seconds']:.2f} s{', ' + metrics if metrics else ''})"
            )
        elif kind == "masked":
            text = (
                f"round {details['server_round']}: masked input accepted "
                f"({details['size']} bytes); waiting for the unmasking"
            )
        elif kind == "shares_refused":
            senders = ", ".join(f"{k} ({v})" for k, v in sorted(details["senders"].items()))
            text = f"round {details['server_round']}: refused the SecAgg shares of {senders}"
        elif kind == "rejected":
            text = f"round {details['server_round']}: update refused: {details['reason']}"
        elif kind == "failed":
            text = f"round {details['server_round']}: training failed: {details['reason']}"
        elif kind == "evaluated":
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(details["metrics"].items()))
            text = (
                f"round {details['server_round']}: evaluated the new model "
                f"(loss {details['loss']:.4f} on {details['num_examples']} examples"
                f"{', ' + metrics if metrics else ''})"
            )
        elif kind == "evaluate_failed":
            text = f"round {details['server_round']}: evaluation failed: {details['reason']}"
        elif kind == "reconnecting":
            text = f"reconnecting in {details['delay_s']:.1f} s: {details['reason']}"
        elif kind == "pending":
            text = (
                f"round {details['server_round']}: resuming the upload of the update kept on disk"
            )
        elif kind == "resumed":
            text = (
                f"round {details['server_round']}: the coordinator holds {details['offset']} of "
                f"{details['size']} bytes: resuming from there"
            )
        elif kind == "compressing":
            text = (
                f"round {details['server_round']}: uploading with {details['codec']} "
                f"({details['reason']})"
            )
        elif kind == "left":
            text = f"left after {details.get('rounds', 0)} rounds"
        else:
            return
        if progress is not None:
            progress.console.print(f"{stamp} {text}", markup=False, highlight=False)
        else:
            out.line(f"{stamp} {text}")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await Runner(client, options, on_event=on_event).run(stop)

    if progress is None:
        return asyncio.run(main())
    with progress.live:
        return asyncio.run(main())


class _TransferProgress:
    """One rich progress bar per transfer in flight: bytes, rate, time left."""

    def __init__(self, out: Output) -> None:
        self.live = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=out.console,
            transient=True,
        )
        self.console = self.live.console
        self._tasks: dict[tuple[str, int], TaskID] = {}

    def update(self, details: dict[str, Any]) -> None:
        key = (details["direction"], details["server_round"])
        if key not in self._tasks:
            verb = "download" if details["direction"] == "down" else "upload"
            self._tasks[key] = self.live.add_task(
                f"round {details['server_round']} {verb}", total=details["total"]
            )
        task = self._tasks[key]
        self.live.update(task, completed=details["done"], total=details["total"])
        if details["done"] >= details["total"]:
            self.live.remove_task(task)
            del self._tasks[key]
