"""Publishing events: numbered per request, sent for all requests in one Redis pipeline per turn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from tokenrelay import wire

log = logging.getLogger(__name__)

# channel, request id, event, and the future of a sender that waits (None: nobody waits)
_Pending = tuple[str, str, dict[str, Any], "asyncio.Future[None] | None"]


class EventSink:
    """Every job's events go through here. Whatever queued up while the last batch was in flight
    goes out as one pipeline with one message per gateway (``wire.encode_events``), so a busy
    worker pays one round trip per engine step and sends each gateway one message, not one per
    request. Batches go out in order, so each request keeps its order."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    def post(self, channel: str, request_id: str, event: dict[str, Any]) -> None:
        """Queue an event without waiting. If its batch fails, a later event of the request that
        is waited for fails too (batches go out in order), or the gateway sees the seq gap."""
        self._queue(channel, request_id, event, None)

    async def publish(self, channel: str, request_id: str, event: dict[str, Any]) -> None:
        """Queue an event and wait until its batch went out (raises what Redis raised)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(channel, request_id, event, future)
        await future

    def _queue(self, channel: str, request_id: str, event: dict[str, Any],
               future: asyncio.Future[None] | None) -> None:
        self._pending.append((channel, request_id, event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

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
                waited = [future for *_, future in batch if future is not None and not future.done()]
                if not waited:
                    log.warning("publishing %d event(s) failed: %s", len(batch), exc)
                for failed in waited:
                    failed.set_exception(exc)
            else:
                for *_, future in batch:
                    if future is not None and not future.done():
                        future.set_result(None)


class Publisher:
    """Numbers one request's events; ``seq`` has no gaps, so the gateway can spot a lost one."""

    def __init__(self, sink: EventSink, reply_to: str, request_id: str) -> None:
        self._sink = sink
        self._channel = reply_to
        self._request_id = request_id
        self.seq = 0

    async def send(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        await self._sink.publish(self._channel, self._request_id, self._next(build, *args, **kwargs))

    def post(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        """``send`` without waiting for Redis: later events still go out after this one."""
        self._sink.post(self._channel, self._request_id, self._next(build, *args, **kwargs))

    def _next(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
        event = build(self.seq, *args, **kwargs)
        self.seq += 1
        return event
