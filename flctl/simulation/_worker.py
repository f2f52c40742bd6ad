"""A simulation worker: loads torch and the task once, then runs virtual clients' tasks in turn.

A worker is told once how its clients run (:class:`WorkerSetup`: the task module, the seed, the
device, the data partitioning, the update encoding), then takes jobs: "fit" or "evaluate" one
model for one virtual client. For each job it builds that client from the task's
``client_fn(context)`` with the client's own context (``partition_id`` of ``num_partitions``,
its id), runs it through the same checks as a deployed client (:func:`flctl.client.fit_client`,
:func:`flctl.client.evaluate_client`), writes the update as a safetensors file and answers
with what the coordinator needs to take it (digest, size, encoding). A client whose code raises
fails that job only, with the one-line reason a deployed client would report.

A client is built anew for every job, so a run does not depend on which worker ran which
client before. State a client must keep between rounds goes in files under
``context.config["flctl.client_dir"]``, a folder of its own that lasts as long as the state
folder (docs/simulation.md).

Jobs and answers are JSON (a line each on the worker's protocol pipe, or the arguments of a Ray
actor's method): nothing a worker receives is unpickled by flctl, and tensors travel as
safetensors files.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from flctl.core import Config

__all__ = ["CLIENT_DIR_KEY", "WorkerCore", "WorkerSetup", "main"]

#: The task config entry naming the folder a virtual client may keep files in between rounds.
CLIENT_DIR_KEY = "flctl.client_dir"
#: The metrics a fit or evaluate may return (the coordinator's ``Limits.max_metrics``).
MAX_METRICS = 64


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker's virtual clients run (the same for every worker of a simulation)."""

    task_path: str
    seed: int
    device: str
    num_partitions: int
    partitioning: str
    alpha: float
    task_config: dict[str, Any]
    update_encoding: str
    update_dtype: str
    num_threads: int
    max_metrics: int
    clients_dir: str
    #: where a worker writes updates ("" : next to the clients' folders)
    out_dir: str = ""
    #: environment entries set before torch loads (CUDA_VISIBLE_DEVICES from Ray, ...)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, num_partitions: int) -> WorkerSetup:
        """The setup of a simulation of ``num_partitions`` clients of the project ``config``.

        Updates are written to ``<state>/simulation/updates`` (on the blob store's file
        system: an accepted one moves into it), each client's folder is under
        ``<state>/simulation/clients``.
        """
        folder = config.state_path / "simulation"
        return cls(
            task_path=str(config.task_path),
            seed=config.project.seed,
            device=config.client.device,
            num_partitions=num_partitions,
            partitioning=config.data.partitioning,
            alpha=config.data.alpha,
            task_config=dict(config.task),
            update_encoding=config.client.update_encoding,
            update_dtype=config.client.update_dtype,
            num_threads=config.client.num_threads,
            max_metrics=MAX_METRICS,
            clients_dir=str(folder / "clients"),
            out_dir=str(folder / "updates"),
        )

    def to_json(self) -> str:
        """The setup as one JSON line."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSetup:
        """The setup a JSON line holds."""
        return cls(**json.loads(text))


class WorkerCore:
    """Runs jobs for virtual clients (see the module docstring); one per worker process."""

    def __init__(self, setup: WorkerSetup) -> None:
        os.environ.update(setup.env)
        import torch

        from flctl.client import resolve_device
        from flctl.core.task import load_task

        torch.set_num_threads(max(1, setup.num_threads))
        self._setup = setup
        self._device = resolve_device(setup.device)
        self._task: ModuleType = load_task(Path(setup.task_path))
        self._out = Path(setup.out_dir or Path(setup.clients_dir).parent / "updates")
        self._out.mkdir(parents=True, exist_ok=True)
        self.jobs_done = 0
        _warm_up(torch)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job; the answer says what came of it (``ok`` false: why, in one line)."""
        from flctl.core.errors import FlctlError

        started = time.perf_counter()
        try:
            answer = self._fit(job) if job["op"] == "fit" else self._evaluate(job)
        except FlctlError as exc:
            answer = {"ok": False, "reason": exc.message}
        self.jobs_done += 1
        answer["job"] = job.get("job", 0)
        answer["seconds"] = round(time.perf_counter() - started, 6)
        return answer

    def stats(self) -> dict[str, Any]:
        """This worker's peak resident memory (bytes) and the jobs it ran."""
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"pid": os.getpid(), "peak_rss": peak_kib * 1024, "jobs": self.jobs_done}

    def _client(self, job: dict[str, Any]) -> Any:
        from flctl.client import Client
        from flctl.core.errors import TaskError
        from flctl.core.task import TaskContext
        from flctl.core.usercode import describe_failure

        setup = self._setup
        client_dir = Path(setup.clients_dir) / job["client_id"]
        context = TaskContext(
            role="client",
            seed=setup.seed,
            device=self._device,
            client_id=job["client_id"],
            partition_id=int(job["partition_id"]),
            num_partitions=setup.num_partitions,
            partitioning=setup.partitioning,
            alpha=setup.alpha,
            config={**setup.task_config, CLIENT_DIR_KEY: str(client_dir)},
        )
        try:
            client = self._task.client_fn(context)
        except Exception as exc:  # user code: that client fails, the worker goes on
            failure = describe_failure(exc, "client_fn")
            raise TaskError(failure.reason) from exc
        if not isinstance(client, Client):
            raise TaskError(f"client_fn returned a {type(client).__name__}, not a flctl Client")
        return client

    def _fit(self, job: dict[str, Any]) -> dict[str, Any]:
        from flctl.client import fit_client
        from flctl.core.dp import split_task
        from flctl.tensors import UpdateEncoding, read_metadata, sha256_file

        setup = self._setup
        privacy, config = split_task(job["config"])
        client = self._client(job)
        out = self._out / f"update-{os.getpid()}-{job.get('job', 0)}-{time.monotonic_ns()}"
        try:
            num_examples, metrics = fit_client(
                client,
                Path(job["model"]),
                config,
                out,
                update_encoding=setup.update_encoding,
                update_dtype=setup.update_dtype,
                privacy=privacy,
                base_digest=job["model_digest"],
            )
            written = UpdateEncoding.from_metadata(read_metadata(out))
            return {
                "ok": True,
                "path": str(out),
                "digest": sha256_file(out),
                "size": out.stat().st_size,
                "num_examples": num_examples,
                "metrics": metrics,
                "encoding": written.encoding,
                "dtype": written.wire_dtype,
            }
        except BaseException:
            out.unlink(missing_ok=True)
            raise

    def _evaluate(self, job: dict[str, Any]) -> dict[str, Any]:
        from flctl.client import evaluate_client
        from flctl.core.dp import split_task

        _, config = split_task(job["config"])
        client = self._client(job)
        loss, num_examples, metrics = evaluate_client(
            client, Path(job["model"]), config, self._setup.max_metrics
        )
        return {"ok": True, "loss": loss, "num_examples": num_examples, "metrics": metrics}


def _warm_up(torch: ModuleType) -> None:
    """Pay torch's one-off costs now, while the coordinator starts, not in round 1.

    A process's first optimizer step imports and sets up parts of torch (about 1.5 s of CPU
    on the reference machine, docs/benchmarks.md) that every later step reuses.
    """
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.zeros(1, 2)).sum().backward()
    optimizer.step()


def main() -> int:
    """Serve jobs on the protocol pipe (the process's stdout as started; stdin for jobs).

    The first line on stdin is the :class:`WorkerSetup`; each following line is a job, each
    answered by one line; an empty line or the end of stdin ends the worker. What the task
    prints goes to stderr: stdout carries the protocol only.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the task's prints go to stderr
    sys.stdout = sys.stderr
    try:
        core = WorkerCore(WorkerSetup.from_json(sys.stdin.readline()))
    except Exception as exc:  # the worker cannot start: say why, as its one answer
        from flctl.core.errors import FlctlError

        reason = exc.message if isinstance(exc, FlctlError) else f"{type(exc).__name__}: {exc}"
        protocol.write(json.dumps({"ready": False, "reason": reason}) + "\n")
        return 1
    protocol.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            break
        job = json.loads(line)
        answer = core.stats() if job.get("op") == "stats" else core.run(job)
        protocol.write(json.dumps(answer) + "\n")
    protocol.flush()
    sys.stderr.flush()
    # nothing is left to write: skip the interpreter's teardown of torch (a second or so)
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
