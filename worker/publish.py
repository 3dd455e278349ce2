"""Publishing events: numbered per request, sent for all requests in one Redis pipeline per turn."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenrelay import wire
from tokenrelay.batching import Batcher

log = logging.getLogger(__name__)

# channel, request id, event
_Event = tuple[str, str, dict[str, Any]]


class EventSink:
    """Every job's events go through here. Whatever queued up while the last batch was in flight
    goes out as one pipeline with one message per gateway (``wire.encode_events``), so a busy
    worker pays one round trip per engine step and sends each gateway one message, not one per
    request. Batches go out in order, so each request keeps its order."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._batcher: Batcher[_Event, None] = Batcher(self._send, on_lost=_lost)

    def post(self, channel: str, request_id: str, event: dict[str, Any]) -> None:
        """Queue an event without waiting. If its batch fails, a later event of the request that
        is waited for fails too (batches go out in order), or the gateway sees the seq gap."""
        self._batcher.post((channel, request_id, event))

    async def publish(self, channel: str, request_id: str, event: dict[str, Any]) -> None:
        """Queue an event and wait until its batch went out (raises what Redis raised)."""
        await self._batcher.call((channel, request_id, event))

    async def _send(self, events: list[_Event]) -> list[Exception | None]:
        by_channel: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for channel, request_id, event in events:
            by_channel.setdefault(channel, []).append((request_id, event))
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, batch in by_channel.items():
                pipe.publish(channel, wire.encode_events(batch))
            await pipe.execute()
        return [None] * len(events)


def _lost(exc: Exception, count: int) -> None:
    log.warning("publishing %d event(s) failed: %s", count, exc)


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
