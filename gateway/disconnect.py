"""Stopping a request's work when its client leaves."""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive


class WatchDisconnect:
    """``async with WatchDisconnect(receive) as watch:`` runs the body in the calling task and
    watches ``receive`` for ``http.disconnect`` meanwhile. When the client leaves first, the body
    is cancelled at the ``await`` it is in, that cancellation ends at the ``async with``, and
    ``watch.gone`` is True. A cancellation from anywhere else (a server shutting down) goes on.

    One watcher task per use: the task group (anyio, ~40 µs) and the two tasks with
    ``asyncio.wait`` (~20 µs) that did this before cost the gateway ~60 µs of CPU per streamed
    request (docs/benchmarks-notes.md).
    """

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WatchDisconnect:
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        # This task runs only while the body waits at an await (leaving the block cancels it in
        # the same step), so the cancel lands at that await.
        if self._task is not None:
            self.gone = True
            self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.gone and self._task is not None:
            # Ours to end, unless someone else cancelled the task too.
            return self._task.uncancel() == 0 and exc_type is asyncio.CancelledError
        return False
