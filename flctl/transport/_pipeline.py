"""A bounded, ordered hand-off from the event loop to one worker thread.

Receiving a stream and hashing/writing what arrives are both CPU work; done in turn on one
thread they add up. Here the event loop receives while a worker thread hashes, checks and
writes the previous pieces (hashlib, numpy and file writes release the GIL), in order, with
at most ``depth`` pieces in flight so memory stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Pipeline"]

T = TypeVar("T")


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
        self._queue: asyncio.Queue[T | None] = asyncio.Queue(depth)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            await asyncio.to_thread(self._work, item)

    async def put(self, item: T) -> None:
        """Queue ``item``; raises what the worker raised, if it failed."""
        if self._task.done():
            self._task.result()
        putter = asyncio.ensure_future(self._queue.put(item))
        done, _ = await asyncio.wait({putter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if putter not in done:
            putter.cancel()
            self._task.result()

    async def close(self) -> None:
        """Wait until every queued item is processed; re-raise a worker error."""
        if not self._task.done():
            await self.put(None)  # type: ignore[arg-type]
        await self._task

    def cancel(self) -> None:
        """Stop without waiting (on an error elsewhere)."""
        self._task.cancel()
