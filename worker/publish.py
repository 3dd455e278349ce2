"""Publishing events: numbered per request, sent for all requests in one Redis pipeline per turn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tokenrelay import wire


class EventSink:
    """Every job's events go through here; whatever queued up while the last batch was in
    flight goes out as one pipeline, so a busy worker pays one round trip per engine step, not
    one per request per step. Batches go out in order, so each channel keeps its order."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pending: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def publish(self, channel: str, data: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, data, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, data, _ in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, _, future in batch:
                    if not future.done():
                        future.set_result(None)


class Publisher:
    """Numbers one request's events; ``seq`` has no gaps, so the gateway can spot a lost one."""

    def __init__(self, sink: EventSink, request_id: str) -> None:
        self._sink = sink
        self._channel = wire.events_channel(request_id)
        self.seq = 0

    async def send(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        event = build(self.seq, *args, **kwargs)
        self.seq += 1
        await self._sink.publish(self._channel, wire.encode_event(event))
