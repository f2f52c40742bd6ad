"""The Ray backend: the simulation's workers as Ray actors, on a local Ray or a Ray cluster.

This module is ``ray``'s one home in flctl (an optional extra: ``pip install 'flctl[ray]'``).
``--ray-address ""`` starts a Ray instance for the run (``ray.init()``, stopped at the end);
``auto`` or ``HOST:PORT`` joins a running cluster (``ray start --head`` ...). Each actor asks
Ray for ``[simulation] client_cpus`` CPUs and ``client_gpus`` GPUs (a fraction lets several
clients share one GPU: Ray sets ``CUDA_VISIBLE_DEVICES`` for the actor) and runs the same
:class:`~flctl.simulation.WorkerCore` as a local worker.

What crosses to an actor is JSON text and safetensors bytes: the model goes out once per round
(``ray.put``, shared by the actors on a node) and each update comes back as its file's bytes,
so actors on other machines need no shared folder for tensors. Ray serialises those values with
its own protocol; the cluster is the trust boundary, as Ray's documentation says of any Ray
cluster: run it on machines only you control.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flctl.core.errors import ConfigError, FlctlError

from ._local import DEPTH
from ._worker import WorkerCore, WorkerSetup

__all__ = ["RayBackend"]

#: Model blobs kept in Ray's object store at once (the round's model, and the one before).
_MODELS_KEPT = 2


class _ActorBody:
    """What each Ray actor runs: a worker core, with tensors in and out as bytes."""

    def __init__(self, setup_json: str) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="flctl-ray-worker-"))
        setup = WorkerSetup.from_json(setup_json)
        setup = WorkerSetup(**{**vars(setup), "out_dir": str(scratch / "updates")})
        self._models = scratch / "models"
        self._models.mkdir(parents=True, exist_ok=True)
        self._core = WorkerCore(setup)

    def ready(self) -> int:
        return os.getpid()

    def run(self, job_json: str, model: bytes) -> tuple[str, bytes]:
        job = json.loads(job_json)
        path = self._models / job["model_digest"]
        if not path.exists():
            for old in self._models.iterdir():  # one model at a time on the worker's disk
                old.unlink(missing_ok=True)
            temp = path.with_suffix(".part")
            temp.write_bytes(model)
            os.replace(temp, path)
        job["model"] = str(path)
        answer = self._core.run(job)
        data = b""
        if answer.get("path"):
            update = Path(answer.pop("path"))
            data = update.read_bytes()
            update.unlink(missing_ok=True)
        return json.dumps(answer), data

    def stats(self) -> str:
        return json.dumps(self._core.stats())


class RayBackend:
    """Runs jobs on ``workers`` Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(
        self,
        setup: WorkerSetup,
        workers: int,
        *,
        address: str = "",
        client_cpus: float = 1.0,
        client_gpus: float = 0.0,
    ) -> None:
        self._setup = setup
        self.workers = workers
        self._address = address
        self._cpus = client_cpus
        self._gpus = client_gpus
        self._ray: Any = None
        self._started_ray = False
        self._actors: list[Any] = []
        self._free: asyncio.Queue[Any] = asyncio.Queue()
        self._models: dict[str, Any] = {}
        self._out = Path(setup.out_dir)

    async def start(self) -> None:
        """Start (or join) Ray and the actors; wait until each has loaded the task.

        Raises:
            ConfigError: Ray is not installed, or the cluster cannot be reached.
            FlctlError: An actor could not start (the task failed to import, ...).
        """
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "the Ray backend needs Ray, which is not installed",
                hint="pip install 'flctl[ray]' (or use --backend local)",
            ) from None
        self._ray = ray
        self._out.mkdir(parents=True, exist_ok=True)
        self._init()  # in the main thread: Ray sets its signal handlers there
        actor_class = ray.remote(num_cpus=self._cpus, num_gpus=self._gpus)(_ActorBody)
        setup_json = self._setup.to_json()
        self._actors = [actor_class.remote(setup_json) for _ in range(self.workers)]
        try:
            await asyncio.gather(*(actor.ready.remote() for actor in self._actors))
        except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's error in its own types
            await self.close()
            raise FlctlError(f"a Ray simulation worker did not start: {_first_line(exc)}") from None
        for actor in self._actors:  # as the local backend: the next call waits in the actor
            for _ in range(DEPTH):
                self._free.put_nowait(actor)

    def _init(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "ERROR",
            "configure_logging": True,
        }
        try:
            if self._address:
                ray.init(address=self._address, **options)
            else:
                # "local": a new instance, even where an earlier `ray start` left its address
                ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
                self._started_ray = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self._address or "a local Ray instance"
            raise ConfigError(
                f"cannot start or reach Ray at {where}: {_first_line(exc)}",
                hint="check `ray status` on the cluster; a cluster with token authentication "
                "(Ray's default) needs RAY_AUTH_MODE=token for a HOST:PORT address, or use "
                "--ray-address auto on one of its nodes; leave --ray-address out to start a "
                "local Ray",
            ) from None

    def _model(self, job: dict[str, Any]) -> Any:
        digest = job["model_digest"]
        ref = self._models.get(digest)
        if ref is None:
            ref = self._models[digest] = self._ray.put(Path(job["model"]).read_bytes())
            while len(self._models) > _MODELS_KEPT:
                del self._models[next(iter(self._models))]
        return ref

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run ``job`` on the next free actor; its answer (an update lands in ``out_dir``)."""
        actor = await self._free.get()
        try:
            try:
                text, data = await actor.run.remote(json.dumps(job), self._model(job))
            except Exception as exc:  # noqa: BLE001 - an actor that died: this job fails
                return {"ok": False, "reason": f"Ray worker failed: {_first_line(exc)}"}
            answer: dict[str, Any] = json.loads(text)
            if answer.get("ok") and job["op"] == "fit":
                path = self._out / f"update-ray-{os.getpid()}-{answer['job']}-{id(data)}"
                await asyncio.to_thread(path.write_bytes, data)
                answer["path"] = str(path)
            return answer
        finally:
            self._free.put_nowait(actor)

    async def stats(self) -> list[dict[str, Any]]:
        """Each actor's peak memory and jobs."""
        texts = await asyncio.gather(*(actor.stats.remote() for actor in self._actors))
        return [json.loads(text) for text in texts]

    async def close(self) -> None:
        """End the actors; stop Ray if this backend started it."""
        ray = self._ray
        if ray is None:
            return
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001, S112 - already gone
                continue
        self._actors.clear()
        self._models.clear()
        if self._started_ray or ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
