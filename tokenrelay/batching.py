"""Many callers' Redis work in one round trip: what they add in one turn of the loop goes together.

Under load the gateway and the worker each have many requests that want a round trip at the same
moment (a wave of enqueues, a step's events, the jobs that end in one step). One call each costs
a turn of a busy event loop each, and under a burst a pooled connection each; one batch costs one.
The gateway's enqueues, the worker's events and the worker's finished jobs go through ``Batcher``.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# One batch's items and their results: an exception in a result fails that item alone.
Send = Callable[[list[T]], Awaitable[list[R | Exception]]]


class Batcher(Generic[T, R]):
    """``await batcher.call(item)`` → ``item``'s result; ``batcher.post(item)`` sends without waiting.

    The items added while no batch is out go in one ``send(items)`` at the loop's next turn;
    those added while it is out go in the next, so batches go out one at a time, in order.
    ``send`` returns one result per item, where an exception fails that item alone; if it raises,
    every item of its batch fails, each caller with an exception object of its own (one shared
    object's traceback grows with each raise). ``on_lost(exc, count)`` hears of a failed batch
    that nobody waited for. When the batch's task is cancelled (the loop is going away), the
    callers of that batch and of the items still queued are cancelled too.
    """

    def __init__(self, send: Send[T, R], *, on_lost: Callable[[Exception, int], None] | None = None) -> None:
        self._send = send
        self._on_lost = on_lost
        self._pending: list[tuple[T, asyncio.Future[R] | None]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue(item, done)
        return await done

    def post(self, item: T) -> None:
        self._queue(item, None)

    async def flushed(self) -> None:
        """Return once what was added so far has gone out or failed."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    def _queue(self, item: T, done: asyncio.Future[R] | None) -> None:
        self._pending.append((item, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
            self._flusher.add_done_callback(self._flusher_ended)

    def _flusher_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():  # possibly before it started: the items still queued wait no more
            for _, done in self._pending:
                if done is not None:
                    done.cancel()
            self._pending = []

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as exc:
                waiting = [done for _, done in batch if done is not None and not done.done()]
                if not waiting and self._on_lost is not None:
                    self._on_lost(exc, len(batch))
                for waiter in waiting:
                    waiter.set_exception(_own_copy(exc))
                continue
            except BaseException:  # cancelled with the loop: its callers are cancelled too
                for _, cancelled in batch:
                    if cancelled is not None:
                        cancelled.cancel()
                raise
            for (_, done), result in zip(batch, results, strict=True):
                if done is None or done.done():
                    continue  # posted, or its caller was cancelled
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)


def _own_copy(exc: Exception) -> Exception:
    try:
        own = copy.copy(exc)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return exc
    own.__cause__ = exc
    return own
