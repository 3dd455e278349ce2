"""tokenrelay.batching: one round trip for what many callers add in one turn of the loop.

The Redis paths that use it (enqueues, events, finished jobs) are tested against a real Redis in
test_redis_paths.py; here the batching itself, with a plain coroutine in place of the round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tokenrelay.batching import Batcher


class Trip:
    """A round trip that records each batch and, while ``gate`` is clear, waits for it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"item {i} refused") if i < 0 else i * 10 for i in items]


async def _until(condition: Callable[[], object]) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def _held_batch(count: int) -> tuple[Trip, Batcher[int, int], list[asyncio.Task[int]]]:
    """A batcher whose first batch, the calls of items 0 .. count - 1, is out and held at the gate."""
    trip = Trip()
    batcher: Batcher[int, int] = Batcher(trip)
    trip.gate.clear()
    calls = [asyncio.create_task(batcher.call(i)) for i in range(count)]
    await _until(lambda: trip.batches)
    return trip, batcher, calls


def test_one_turn_goes_in_one_batch_and_later_items_in_the_next_in_order() -> None:
    async def body() -> None:
        trip, batcher, first = await _held_batch(3)
        second = [asyncio.ensure_future(batcher.call(i)) for i in range(3, 6)]
        await asyncio.sleep(0)  # their tasks add 3, 4, 5
        batcher.post(6)
        assert trip.batches == [[0, 1, 2]]  # nothing else goes out while a batch is out
        trip.gate.set()
        assert await asyncio.gather(*first, *second) == [0, 10, 20, 30, 40, 50]
        await batcher.flushed()
        assert trip.batches == [[0, 1, 2], [3, 4, 5, 6]]

    asyncio.run(body())


def test_an_item_refused_alone_fails_only_its_caller() -> None:
    async def body() -> None:
        batcher: Batcher[int, int] = Batcher(Trip())
        results = await asyncio.gather(batcher.call(1), batcher.call(-1), batcher.call(2), return_exceptions=True)
        assert results[0] == 10 and results[2] == 20
        assert isinstance(results[1], ValueError) and "item -1 refused" in str(results[1])

    asyncio.run(body())


def test_a_failed_batch_fails_each_caller_with_its_own_error_and_reports_a_posted_one() -> None:
    async def body() -> None:
        trip = Trip()
        lost: list[tuple[str, int]] = []
        batcher: Batcher[int, int] = Batcher(trip, on_lost=lambda exc, count: lost.append((str(exc), count)))
        trip.fail = ConnectionError("redis went away")
        errors = await asyncio.gather(*(batcher.call(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(e, ConnectionError) and str(e) == "redis went away" for e in errors)
        assert len({id(e) for e in errors}) == 3  # a traceback each
        assert all(e.__cause__ is trip.fail for e in errors)  # type: ignore[union-attr]
        assert lost == []  # someone waited for that batch
        batcher.post(1)
        batcher.post(2)
        await batcher.flushed()
        assert lost == [("redis went away", 2)]

    asyncio.run(body())


def test_a_cancelled_caller_leaves_the_rest_of_its_batch_answered() -> None:
    async def body() -> None:
        trip, _, calls = await _held_batch(3)
        calls[1].cancel()
        trip.gate.set()
        assert await calls[0] == 0 and await calls[2] == 20
        assert calls[1].cancelled()

    asyncio.run(body())


def test_cancelling_the_batch_in_flight_cancels_its_callers_and_the_queued_ones() -> None:
    async def body() -> None:
        trip, batcher, out = await _held_batch(2)
        queued = asyncio.ensure_future(batcher.call(9))
        await asyncio.sleep(0)  # queued behind the batch that is out
        flusher = batcher._flusher
        assert flusher is not None
        flusher.cancel()  # what happens to it when its loop shuts down
        for call in [*out, queued]:
            with pytest.raises(asyncio.CancelledError):
                await call
        assert trip.batches == [[0, 1]]
        trip.gate.set()
        assert await batcher.call(4) == 40  # the next item starts a new batch

    asyncio.run(body())
