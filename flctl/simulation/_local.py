"""The local backend: a fixed pool of worker processes on this machine.

Each worker is ``python -m flctl.simulation._worker``: it loads torch and the task once and
runs one job at a time, speaking JSON lines on its stdin and stdout (nothing pickled). A job
waits for a free worker. A worker that dies fails the job it ran (with its exit code and where
its log is) and is started again. What the task prints goes to the worker's log file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from flctl.core.errors import FlctlError

from ._worker import WorkerSetup

__all__ = ["LocalBackend"]

#: The longest a worker may take to load torch and the task.
START_TIMEOUT_S = 120.0
#: Jobs sent to a worker at once (one running, the next waiting in its pipe).
DEPTH = 2


class _Worker:
    """One worker process, the jobs sent to it and not yet answered (oldest first)."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.index = index
        self.process = process
        self.log = log
        self.waiting: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self.reader: asyncio.Task[None] | None = None
        self.dead = False

    async def read(self) -> None:
        """Hand each answer line to the job that waits for it, in order; fail them at EOF."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(json.loads(line))
        finally:
            self.dead = True
            while self.waiting:
                future = self.waiting.popleft()
                if not future.done():
                    future.set_exception(EOFError("the worker closed its pipe"))

    async def ask(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send ``job``; its answer (the worker answers its jobs in the order sent)."""
        stdin = self.process.stdin
        assert stdin is not None
        if self.dead:
            raise EOFError("the worker closed its pipe")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        stdin.write(json.dumps(job).encode() + b"\n")
        await stdin.drain()
        return await future


class LocalBackend:
    """Runs jobs on ``workers`` local processes (see the module docstring).

    Each worker has :data:`DEPTH` jobs sent at once: the next job waits in its pipe while it
    runs one, so a worker never idles while the coordinator takes the last answer.

    Args:
        setup: What every worker is told first.
        workers: How many processes.
        log_dir: Where each worker's output goes (``worker-N.log``).
    """

    name = "local"

    def __init__(self, setup: WorkerSetup, workers: int, log_dir: Path) -> None:
        self._setup = setup
        self.workers = workers
        self._log_dir = log_dir
        #: a worker once per job it may take now (DEPTH entries for an idle worker)
        self._free: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: list[_Worker] = []
        #: peak memory of workers that were replaced (their stats died with them)
        self._lost: list[dict[str, Any]] = []

    async def start(self) -> None:
        """Start every worker and wait until each has loaded the task.

        Raises:
            FlctlError: A worker could not start (its reason, e.g. task.py failed to import).
        """
        self._log_dir.mkdir(parents=True, exist_ok=True)
        started = await asyncio.gather(
            *(self._spawn(i) for i in range(self.workers)), return_exceptions=True
        )
        failure = next((r for r in started if isinstance(r, BaseException)), None)
        for result in started:
            if not isinstance(result, BaseException):
                self._add(result)
        if failure is not None:
            await self.close()
            raise failure

    def _add(self, worker: _Worker) -> None:
        worker.reader = asyncio.create_task(worker.read(), name=f"flctl-worker-{worker.index}")
        self._all.append(worker)
        for _ in range(DEPTH):
            self._free.put_nowait(worker)

    async def _spawn(self, index: int) -> _Worker:
        log = open(self._log_dir / f"worker-{index}.log", "ab")  # noqa: SIM115 - lives with it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flctl.simulation._worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            limit=1 << 20,
        )
        worker = _Worker(index, process, log)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(self._setup.to_json().encode() + b"\n")
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        ready = json.loads(line) if line.strip() else {"ready": False, "reason": ""}
        if not ready.get("ready"):
            await self._end(worker)
            reason = ready.get("reason") or f"see {self._log_dir / f'worker-{index}.log'}"
            raise FlctlError(f"simulation worker {index} did not start: {reason}")
        return worker

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run ``job`` on the next worker with room; its answer."""
        while (worker := await self._free.get()).dead and worker not in self._all:
            continue  # a slot of a worker that died and was replaced
        try:
            answer = await worker.ask(job)
        except (ConnectionError, EOFError):
            return await self._replace(worker, job)
        self._free.put_nowait(worker)
        return answer

    async def _replace(self, worker: _Worker, job: dict[str, Any]) -> dict[str, Any]:
        """The worker died during ``job``: the job fails, a new worker takes its place."""
        if worker in self._all:  # the first of its jobs to hear of it replaces it
            self._all.remove(worker)
            with contextlib.suppress(Exception):
                await self._end(worker)
            self._lost.append({"pid": worker.process.pid, "peak_rss": 0, "jobs": 0})
            self._add(await self._spawn(worker.index))
        code = worker.process.returncode
        return {
            "ok": False,
            "reason": f"simulation worker {worker.index} exited (code {code}) during the job: "
            f"see {self._log_dir / f'worker-{worker.index}.log'}",
            "job": job.get("job", 0),
        }

    async def stats(self) -> list[dict[str, Any]]:
        """Each worker's peak memory and jobs (answered after the jobs sent before)."""
        answers = await asyncio.gather(
            *(w.ask({"op": "stats"}) for w in self._all), return_exceptions=True
        )
        return [a for a in answers if isinstance(a, dict)] + self._lost

    async def close(self) -> None:
        """End every worker (its stdin closes; killed if it does not exit in 5 s)."""
        await asyncio.gather(*(self._end(worker) for worker in self._all))
        self._all.clear()

    @staticmethod
    async def _end(worker: _Worker) -> None:
        process = worker.process
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            process.kill()
            await process.wait()
        if worker.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(worker.reader, 5.0)
        worker.log.close()
