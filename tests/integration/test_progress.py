"""Progress a task reports from its fit reaches the coordinator with the client's heartbeats."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from flctl.client import JoinOptions, Runner
from flctl.coordinator import Coordinator
from flctl.core import TaskContext, load_task
from flctl.security import load_credentials

from .conftest import Project, admin, wait_until

pytestmark = pytest.mark.timeout(120)


def test_progress_reported_by_fit_reaches_the_coordinator(project: Project) -> None:
    config = project.write(rounds={"min_clients": 1})
    task = load_task(config.task_path)
    release = threading.Event()

    class ReportingClient(task.TinyClient):  # type: ignore[name-defined,misc]
        def fit(self, parameters: Any, config: Any) -> Any:
            self.context.report_progress(1, 4)
            self.context.report_progress(2, 4)
            release.wait(30)  # the test looks at the coordinator while "training" is half done
            result = super().fit(parameters, config)
            self.context.report_progress(4, 4)
            return result

    context = TaskContext(
        role="client",
        seed=config.project.seed,
        client_id="c1",
        num_partitions=3,
        config=dict(config.task),
    )
    cert, key, ca = load_credentials(config.certs_path, "c1")

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        options = JoinOptions(
            server=address,
            client_id="c1",
            cert_pem=cert,
            key_pem=key,
            ca_pem=ca,
            cache_dir=config.root / ".cache" / "c1",
        )
        runner = Runner(ReportingClient(context), options)
        stop = asyncio.Event()
        running = asyncio.create_task(runner.run(stop))
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
            ids = list((await client.start_round(1)).round_ids)

            async def halfway() -> bool:
                status = await client.status(ids)
                participants = status.open_round.participants
                return [(p.client_id, p.state, p.progress) for p in participants] == [
                    ("c1", "training", 0.5)
                ]

            await wait_until(halfway, timeout=30)
            release.set()

            async def committed() -> bool:
                return (await client.status(ids)).rounds[0].status == "committed"

            await wait_until(committed, timeout=30)
        finally:
            release.set()
            stop.set()
            await asyncio.gather(running, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
