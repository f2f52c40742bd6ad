"""The coordinator serves a model only once its blob hashed to its digest.

A head model whose blob changed on disk (a flipped bit, a truncated copy, a restore gone
wrong) would be sent to every client, which would refuse it after the download and come back
for it: every round would fail. :class:`ModelCheck` hashes a model's blob before it is first
served (at start, and before each round on a head it has not checked yet: after a rollback or
an import), records a corrupt one once as a ``model.corrupt`` event, and says why rounds are
refused until the head is an intact version again.
"""

from __future__ import annotations

import asyncio
import logging

from flctl.core import events as ev
from flctl.core.errors import NotFoundError
from flctl.store import BlobStore, ModelRecord, SqlStore

from ._events import EventLog

__all__ = ["ModelCheck"]

log = logging.getLogger("flctl.coordinator")


class ModelCheck:
    """Which model blobs hashed to their digest, and which did not.

    Args:
        store: The state store (to find an intact version to roll back to).
        blobs: The blob store.
        events: Where ``model.corrupt`` is recorded.
    """

    def __init__(self, store: SqlStore, blobs: BlobStore, events: EventLog) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._verified: set[str] = set()
        #: digest -> why it is not served (kept so that the event is recorded once)
        self._corrupt: dict[str, str] = {}

    def trust(self, digest: str) -> None:
        """Count ``digest`` as verified: a blob this coordinator hashed as it wrote it."""
        self._verified.add(digest)
        self._corrupt.pop(digest, None)

    async def check(self, model: ModelRecord) -> str | None:
        """Hash ``model``'s blob unless done before; why it must not be served, or None.

        A corrupt (or missing) blob is hashed again at each call, so that a blob restored
        from a backup is served again; its ``model.corrupt`` event is recorded once.
        """
        if model.digest in self._verified:
            return None
        problem, rollback_to = await asyncio.to_thread(self._inspect, model)
        if problem is None:
            self.trust(model.digest)
            return None
        if rollback_to is not None:
            way_out = f"roll back to an intact version with `flctl models rollback {rollback_to}`"
        else:
            way_out = (
                "no earlier version is intact: restore the blob from a backup "
                "(`flctl models verify` lists every damaged version)"
            )
        reason = (
            f"the head model v{model.version} is corrupt: {problem}; it is not served and no "
            f"round starts until the head is intact: {way_out}"
        )
        if self._corrupt.get(model.digest) != reason:
            log.error("%s", reason)
            self._events.emit(
                ev.ModelCorrupt(
                    version=model.version,
                    digest=model.digest,
                    path=str(self._blobs.path(model.digest)),
                    problem=problem,
                    rollback_to=rollback_to,
                    reason=reason,
                )
            )
        self._corrupt[model.digest] = reason
        return reason

    def _intact(self, digest: str) -> bool:
        try:
            return self._blobs.verify(digest)
        except NotFoundError:
            return False

    def _inspect(self, model: ModelRecord) -> tuple[str | None, int | None]:
        """What is wrong with ``model``'s blob (None: nothing), and the newest intact version."""
        path = self._blobs.path(model.digest)
        if not path.is_file():
            problem = f"its blob {path} (sha256 {model.digest}) is missing"
        elif not self._intact(model.digest):
            problem = f"its blob {path} no longer hashes to its digest sha256 {model.digest}"
        else:
            return None, None
        for record in self._store.list_models(include_rejected=False):  # newest first
            if record.digest == model.digest:
                continue
            if record.digest in self._verified or self._intact(record.digest):
                return problem, record.version
        return problem, None
