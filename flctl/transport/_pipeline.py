"""A bounded, ordered hand-off from the event loop to one worker thread.

Receiving a stream and hashing/writing what arrives are both CPU work; done in turn on one
thread they add up. Here the event loop receives while a worker thread hashes, checks and
writes the previous pieces (hashlib, numpy and file writes release the GIL), in order, with
at most ``depth`` pieces in flight so memory stays bounded.

The worker is a thread of its own that takes the next piece as soon as it is free: the event
loop, busy receiving, is not asked to hand each piece over (a round trip through the loop per
piece left the worker idle while the loop ran gRPC). The loop is woken only when it waits for
room in a full queue, and when the worker ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Pipeline"]

T = TypeVar("T")

_STOP = object()


class Pipeline(Generic[T]):
    """Feeds items, in order, to ``work`` in a worker thread.

    Example:
        ```python
        pipeline = Pipeline(sink.write)
        async for piece in stream:
            await pipeline.put(piece)
        await pipeline.close()  # waits for the last piece; re-raises a worker error
        ```
    """

    def __init__(self, work: Callable[[T], object], *, depth: int = 4) -> None:
        self._work = work
        self._loop = asyncio.get_running_loop()
        self._items: queue.Queue[object] = queue.Queue(depth)
        self._space = asyncio.Event()
        self._waiting = False  # the loop waits for room: the worker wakes it after a take
        self._cancelled = False
        self._error: BaseException | None = None
        self._finished: asyncio.Future[None] = self._loop.create_future()
        # started by the first piece: a transfer still waiting for its first byte (a client in
        # the coordinator's queue for a download slot) holds no thread
        self._thread = threading.Thread(target=self._run, name="flctl-pipeline", daemon=True)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        while True:
            item = self._items.get()
            if self._waiting:
                self._call(self._space.set)
            if item is _STOP or self._cancelled:
                break
            try:
                self._work(item)  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the loop, re-raised by put and close
                self._error = exc
                break
        self._call(self._finish)

    def _call(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback)

    def _finish(self) -> None:
        if not self._finished.done():
            self._finished.set_result(None)
        self._space.set()

    # ------------------------------------------------------------------ event loop

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def put(self, item: T) -> None:
        """Queue ``item``; raises what the worker raised, if it failed."""
        await self._put(item)

    async def _put(self, item: object) -> None:
        self._raise_if_failed()
        if self._thread.ident is None and not self._finished.done():
            self._thread.start()
        while True:
            try:
                self._items.put_nowait(item)
                return
            except queue.Full:
                pass
            self._space.clear()
            self._waiting = True
            try:
                try:  # the worker may have taken a piece before it saw ``_waiting``
                    self._items.put_nowait(item)
                    return
                except queue.Full:
                    pass
                space: asyncio.Future[Any] = asyncio.ensure_future(self._space.wait())
                waiters: set[asyncio.Future[Any]] = {space, self._finished}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    space.cancel()
            finally:
                self._waiting = False
            self._raise_if_failed()
            if self._finished.done():
                raise RuntimeError("the pipeline's worker has stopped")

    async def close(self) -> None:
        """Wait until every queued item is processed; re-raise a worker error."""
        if self._thread.ident is None:  # never started: nothing was queued
            self._finish()
        if not self._finished.done():
            await self._put(_STOP)
        await asyncio.shield(self._finished)
        self._raise_if_failed()

    def cancel(self) -> None:
        """Stop without waiting (on an error elsewhere)."""
        self._cancelled = True
        with contextlib.suppress(queue.Full):
            self._items.put_nowait(_STOP)

    async def cancel_and_wait(self) -> None:
        """Stop, and wait for the worker to finish the piece in hand (not the queued ones).

        For a caller about to close what the worker writes to: after this, nothing does.
        """
        self.cancel()
        if self._thread.ident is not None:
            await asyncio.shield(self._finished)
