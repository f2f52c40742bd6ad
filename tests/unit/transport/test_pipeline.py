"""The loop-to-worker pipeline: order, bounds, errors and cancellation, with a real thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flctl.transport import Pipeline


def test_items_reach_the_worker_in_order_on_another_thread() -> None:
    seen: list[int] = []
    threads: set[int] = set()

    def work(item: int) -> None:
        threads.add(threading.get_ident())
        seen.append(item)

    async def main() -> None:
        pipeline: Pipeline[int] = Pipeline(work, depth=3)
        for i in range(500):
            await pipeline.put(i)
        await pipeline.close()
        assert threading.get_ident() not in threads

    asyncio.run(main())
    assert seen == list(range(500))
    assert len(threads) == 1


def test_at_most_depth_items_wait_while_the_worker_is_busy() -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def work(item: int) -> None:
        started.set()
        release.wait(30)
        done.append(item)

    async def main() -> None:
        pipeline: Pipeline[int] = Pipeline(work, depth=2)
        await pipeline.put(0)  # taken by the worker, which then blocks
        await asyncio.to_thread(started.wait, 30)
        await pipeline.put(1)
        await pipeline.put(2)  # the queue holds 1 and 2: full
        blocked = asyncio.create_task(pipeline.put(3))
        await asyncio.sleep(0.1)
        assert not blocked.done()  # no room until the worker takes the next item
        release.set()
        await asyncio.wait_for(blocked, 30)
        await pipeline.close()

    asyncio.run(main())
    assert done == [0, 1, 2, 3]


def test_a_worker_error_is_raised_by_put_and_close() -> None:
    def work(item: int) -> None:
        if item == 3:
            raise ValueError("bad piece 3")

    async def main() -> None:
        pipeline: Pipeline[int] = Pipeline(work, depth=1)
        with pytest.raises(ValueError, match="bad piece 3"):
            for i in range(1000):
                await pipeline.put(i)
        with pytest.raises(ValueError, match="bad piece 3"):
            await pipeline.close()

    asyncio.run(main())


def test_close_raises_an_error_in_the_last_item() -> None:
    def work(item: int) -> None:
        raise OSError("disk full")

    async def main() -> None:
        pipeline: Pipeline[int] = Pipeline(work)
        await pipeline.put(1)
        with pytest.raises(OSError, match="disk full"):
            await pipeline.close()

    asyncio.run(main())


def test_cancel_stops_the_worker_without_working_on_what_is_queued() -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def work(item: int) -> None:
        started.set()
        release.wait(30)
        done.append(item)

    async def main() -> None:
        pipeline: Pipeline[int] = Pipeline(work, depth=4)
        for i in range(4):
            await pipeline.put(i)
        await asyncio.to_thread(started.wait, 30)
        pipeline.cancel()
        release.set()
        await asyncio.to_thread(pipeline._thread.join, 30)
        assert not pipeline._thread.is_alive()

    asyncio.run(main())
    assert done == [0]  # the item in hand finishes; the queued ones are dropped


def test_the_thread_starts_with_the_first_piece_and_ends_on_close() -> None:
    async def main() -> None:
        unused: Pipeline[int] = Pipeline(lambda item: None)
        await unused.close()
        assert unused._thread.ident is None  # nothing queued: no thread was started
        pipeline: Pipeline[int] = Pipeline(lambda item: None)
        await pipeline.put(1)
        assert pipeline._thread.ident is not None
        await pipeline.close()
        await asyncio.to_thread(pipeline._thread.join, 30)
        assert not pipeline._thread.is_alive()
        await pipeline.close()  # a second close is harmless

    asyncio.run(main())


def test_cancel_and_wait_returns_once_the_piece_in_hand_is_done() -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def work(item: int) -> None:
        started.set()
        release.wait(30)
        done.append(item)

    async def main() -> None:
        idle: Pipeline[int] = Pipeline(work)
        await idle.cancel_and_wait()  # never started: nothing to wait for
        pipeline: Pipeline[int] = Pipeline(work, depth=4)
        for i in range(3):
            await pipeline.put(i)
        await asyncio.to_thread(started.wait, 30)
        stopping = asyncio.create_task(pipeline.cancel_and_wait())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # the worker still holds piece 0
        release.set()
        await asyncio.wait_for(stopping, 30)
        assert done == [0]
        await asyncio.to_thread(pipeline._thread.join, 30)
        assert not pipeline._thread.is_alive()

    asyncio.run(main())
