"""The local backend: a fixed pool of worker processes on this machine.

Each worker is ``python -m flctl.simulation._worker``: it loads torch and the task once and
runs one job at a time, speaking JSON lines on its stdin and stdout (nothing pickled). A job
waits for a free worker. A worker that dies fails the job it ran (with its exit code and where
its log is) and is started again. What the task prints goes to the worker's log file.
"""

from __future__ import annotations

import asyncio
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


class _Worker:
    def __init__(self, index: int, process: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.index = index
        self.process = process
        self.log = log


class LocalBackend:
    """Runs jobs on ``workers`` local processes (see the module docstring).

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
        for result in started:
            if isinstance(result, BaseException):
                await self.close()
                raise result
            self._all.append(result)
            self._free.put_nowait(result)

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
        """Run ``job`` on the next free worker; its answer."""
        worker = await self._free.get()
        try:
            return await self._ask(worker, job)
        except (ConnectionError, EOFError) as exc:
            code = worker.process.returncode
            with contextlib.suppress(Exception):
                await self._end(worker)
            self._all.remove(worker)
            reason = (
                f"simulation worker {worker.index} exited (code {code}) during the job: "
                f"see {self._log_dir / f'worker-{worker.index}.log'}"
            )
            self._lost.append({"pid": worker.process.pid, "peak_rss": 0, "jobs": 0})
            worker = await self._spawn(worker.index)
            self._all.append(worker)
            return {"ok": False, "reason": reason or str(exc), "job": job.get("job", 0)}
        finally:
            self._free.put_nowait(worker)

    @staticmethod
    async def _ask(worker: _Worker, job: dict[str, Any]) -> dict[str, Any]:
        process = worker.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(job).encode() + b"\n")
        await process.stdin.drain()
        line = await process.stdout.readline()
        if not line:
            raise EOFError("worker closed its pipe")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stats(self) -> list[dict[str, Any]]:
        """Each worker's peak memory and jobs (waits for the workers to be free)."""
        taken = [await self._free.get() for _ in self._all]
        try:
            return [await self._ask(w, {"op": "stats"}) for w in taken] + self._lost
        finally:
            for worker in taken:
                self._free.put_nowait(worker)

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
        worker.log.close()
