"""The in-process transport: clients that run inside the coordinator's process.

``flctl simulate`` drives thousands of virtual clients through the same round engine, strategy,
privacy wrapper, validation gate, store and event log as ``flctl serve``; only the transport
differs. Where a deployed client joins over mutual TLS, streams its tasks, downloads the model
and uploads its update in protobuf messages, an in-process client here:

- joins with :meth:`LocalClients.connect` (a session, its task stream open: selectable);
- reads its tasks from the session's queue, the same :class:`~flctl.core.work.Task` values
  the gRPC transport turns into messages;
- reads the model from the blob store's file itself (:meth:`LocalClients.model_path`): no copy;
- hands its update over as a safetensors file (:meth:`LocalClients.upload`), which goes
  through the same upload path as a deployed client's bytes (:class:`UpdateIntake`: header
  checks, round state, tensor names, shapes, dtypes and finite values, size, digest), so an
  update a deployed coordinator would refuse is refused here, with the same reason;
- reports a failed task or its evaluation as a deployed client does (:meth:`task_failed`,
  :meth:`evaluation`);
- in a round with secure aggregation, sends its stage messages (:meth:`secagg`) as a deployed
  client calls the ``SecAgg`` RPC, and hands its masked input over as its update.

No TLS and no protobuf: the process is the trust boundary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flctl.core.work import SecAggAnswer, Task, UploadAnswer, UploadHeader
from flctl.store import BlobStore
from flctl.transport.grpc import RpcContext

from ._registry import Session
from ._service import CoordinatorService

__all__ = ["LocalClients"]


class LocalClients:
    """The coordinator's end of the in-process transport (see the module docstring).

    Args:
        service: The coordinator's client-facing handlers (sessions, upload path).
        blobs: The blob store the models are read from.
        max_chunk_bytes: The size of the pieces an update is handed over in.
    """

    def __init__(self, service: CoordinatorService, blobs: BlobStore, max_chunk_bytes: int) -> None:
        self._service = service
        self._blobs = blobs
        self._chunk = max_chunk_bytes
        self._sessions: dict[str, Session] = {}

    def connect(self, client_id: str, on_task: Callable[[str], None] | None = None) -> Session:
        """Join ``client_id`` and open its task stream; a task it was sent before comes again.

        ``on_task`` is called with the client's id whenever a task (or the end: None) is put
        on its queue, so that one dispatcher serves every client instead of one waiter each.
        """
        queue = _Inbox(client_id, on_task) if on_task is not None else None
        session = self._service.open_local(client_id, queue)
        self._sessions[client_id] = session
        return session

    def connect_all(
        self, client_ids: list[str], on_task: Callable[[str], None] | None = None
    ) -> list[Session]:
        """:meth:`connect` each of ``client_ids``, recorded in one transaction."""
        with self._service.batch():
            return [self.connect(client_id, on_task) for client_id in client_ids]

    def session(self, client_id: str) -> Session | None:
        """``client_id``'s session, while it is connected."""
        return self._sessions.get(client_id)

    def disconnect(self, client_id: str, reason: str = "disconnected") -> None:
        """End ``client_id``'s session (the round's rejoin grace applies, as on a network)."""
        session = self._sessions.pop(client_id, None)
        if session is not None:
            self._service.close_local(session, reason)

    def close(self) -> None:
        """End every session (recorded in one transaction)."""
        with self._service.batch():
            for client_id in list(self._sessions):
                self.disconnect(client_id, "simulation ended")

    @staticmethod
    async def next_task(session: Session) -> Task | None:
        """The client's next task; None once its session has ended."""
        return await session.queue.get()

    def model_path(self, digest: str) -> Path:
        """The file of model ``digest`` in the blob store (to read, never to write)."""
        return self._blobs.path(self._blobs.check_digest(digest))

    async def upload(self, session: Session, header: UploadHeader, path: Path) -> UploadAnswer:
        """Hand the update in ``path`` to the upload path, announced by ``header``.

        The file moves into the blob store when accepted (it must be on the state folder's
        file system); refused, it stays where it is.

        Raises:
            FlctlError: The update was refused as malformed (its task is over), or the
                coordinator cannot take it now (storage full).
        """
        session.last_seen = time.time()
        return await self._service.intake.accept_file(header, path, session, _context(session))

    async def secagg(
        self, session: Session, task: Task, stage: str, payload: bytes
    ) -> SecAggAnswer:
        """Send the client's message of a secure-aggregation stage; answer once it closed.

        Raises:
            FlctlError: A field is malformed (as the RPC refuses it).
        """
        return await self._service.secagg_step(
            session, task.server_round, task.task_id, stage, payload
        )

    def task_failed(self, session: Session, server_round: int, reason: str) -> None:
        """The client's task of ``server_round`` failed with ``reason``."""
        self._service.task_failed(session, server_round, reason)

    def evaluation(
        self,
        session: Session,
        task: Task,
        *,
        loss: float = 0.0,
        num_examples: int = 0,
        metrics: Mapping[str, object] | None = None,
        failure: str = "",
    ) -> str | None:
        """Report the client's evaluation of ``task``'s model (or why it failed).

        Returns None when taken, or why not. Raises as a deployed report is refused.
        """
        return self._service.evaluation(
            session,
            task.server_round,
            task.task_id,
            loss=loss,
            num_examples=num_examples,
            metrics=metrics or {},
            failure=failure,
        )


class _Inbox(asyncio.Queue[Task | None]):
    """A session's task queue that tells a callback when something is put on it."""

    def __init__(self, client_id: str, on_put: Callable[[str], None]) -> None:
        super().__init__()
        self._client_id = client_id
        self._on_put = on_put

    def put_nowait(self, item: Task | None) -> None:
        super().put_nowait(item)
        self._on_put(self._client_id)


def _context(session: Session) -> RpcContext:
    """The caller as the upload path's checks see it: the client's identity, no certificate."""
    return RpcContext(
        identity=session.client_id, role="client", fingerprint="", token="", peer="in-process"
    )
