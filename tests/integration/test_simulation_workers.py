"""The local backend's worker processes: jobs in order, a worker that dies is replaced."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from flctl.core import Config, ProjectConfig
from flctl.simulation import WorkerSetup
from flctl.simulation._local import LocalBackend
from flctl.tensors import save_parameters

pytestmark = pytest.mark.timeout(180)

TASK = Path(__file__).parent / "tiny_task.py"


def test_a_worker_that_dies_fails_its_jobs_and_is_replaced(tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text(
        TASK.read_text()
        + "\n_original = client_fn\n\n"
        + "def client_fn(context):\n"
        + "    if context.client_id == 'sim-00003':\n"
        + "        import os\n"
        + "        os._exit(3)  # the process dies, as on a segfault or an OOM kill\n"
        + "    return _original(context)\n"
    )
    model = tmp_path / "model"
    save_parameters(dict(torch.nn.Linear(4, 2).state_dict()), model)

    def job(i: int) -> dict[str, object]:
        return {
            "op": "fit",
            "job": i,
            "client_id": f"sim-{i:05d}",
            "partition_id": i,
            "model": str(model),
            "model_digest": "0" * 64,
            "config": {"server_round": 1},
        }

    async def main() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        config = Config(project=ProjectConfig(task=str(task)), root=tmp_path)
        backend = LocalBackend(WorkerSetup.from_config(config, 8), 1, tmp_path / "logs")
        await backend.start()
        try:
            answers = await asyncio.gather(*(backend.run(job(i)) for i in range(8)))
            return list(answers), await backend.stats()
        finally:
            await backend.close()

    answers, stats = asyncio.run(main())
    assert [a["job"] for a in answers] == list(range(8))  # each answer went to its own job
    failed = {int(str(a["job"])) for a in answers if not a["ok"]}
    # the job that killed it fails, and so may the one queued behind it in the same pipe
    assert 3 in failed and failed <= {3, 4}, answers
    assert "simulation worker 0 exited (code 3)" in str(answers[3]["reason"])
    assert all(a["ok"] for a in answers if int(str(a["job"])) not in failed)
    # the replacement ran the jobs after the failure; the dead one is listed, its stats lost
    live, lost = stats
    assert lost["peak_rss"] == 0 and int(str(live["peak_rss"])) > 0
    assert int(str(live["jobs"])) == len([i for i in range(8) if i > max(failed)])
