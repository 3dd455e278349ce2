"""Publishing events: numbered per request, sent for all requests in one Redis pipeline per turn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tokenrelay import wire

_Pending = tuple[str, str, dict[str, Any], "asyncio.Future[None]"]


class EventSink:
    """Every job's events go through here. Whatever queued up while the last batch was in flight
    goes out as one pipeline with one message per gateway (``wire.encode_events``), so a busy
    worker pays one round trip per engine step and sends each gateway one message, not one per
    request. Batches go out in order, so each request keeps its order."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    def post(self, channel: str, request_id: str, event: dict[str, Any]) -> asyncio.Future[None]:
        """Queue an event without waiting; the future ends when its batch went out (or failed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, request_id, event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            by_channel: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for channel, request_id, event, _ in batch:
                by_channel.setdefault(channel, []).append((request_id, event))
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for channel, events in by_channel.items():
                        pipe.publish(channel, wire.encode_events(events))
                    await pipe.execute()
            except Exception as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for *_, future in batch:
                    if not future.done():
                        future.set_result(None)


class Publisher:
    """Numbers one request's events; ``seq`` has no gaps, so the gateway can spot a lost one."""

    def __init__(self, sink: EventSink, reply_to: str, request_id: str) -> None:
        self._sink = sink
        self._channel = reply_to
        self._request_id = request_id
        self.seq = 0

    async def send(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        await self.post(build, *args, **kwargs)

    def post(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        """``send`` without waiting for Redis: later events still go out after this one."""
        event = build(self.seq, *args, **kwargs)
        self.seq += 1
        return self._sink.post(self._channel, self._request_id, event)
