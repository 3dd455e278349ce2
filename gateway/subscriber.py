"""Every request's events on one Redis pub/sub channel of this gateway, read by one task.

The gateway SUBSCRIBEs once to its own ``wire.reply_channel`` and every job it enqueues names
that channel; workers send the events of many of its requests in one message. A request's
``Inbox`` is registered before its job is enqueued, with no round trip of its own: a SUBSCRIBE
per request had cost a round trip (and an UNSUBSCRIBE) per request, each waiting for a turn of a
busy event loop before the job could even be enqueued.

Redis drops what is published before a SUBSCRIBE is confirmed, so ``open`` returns only once
the channel's subscription is confirmed. If the connection fails, every open inbox raises that
error, so each request ends with an error rather than waiting; the next ``open`` connects and
subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay import wire

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0
READ_WAIT_S = 1.0  # one read's wait; the reader loops (a bounded read is not cut by socket_timeout)

Event = dict[str, Any]


class Inbox:
    """One request's events, in order. ``get`` returns None after ``timeout`` seconds.

    A deque and one future per wait, not an ``asyncio.Queue`` under ``asyncio.timeout``: a
    stream waits once per token, and that pair cost ~8 µs per wait against ~3 here (uvloop).
    """

    def __init__(self, subscriber: Subscriber, request_id: str) -> None:
        self.request_id = request_id
        self._subscriber = subscriber
        self._items: deque[Event | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Event | BaseException) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float) -> Event | None:
        if not self._items:
            if timeout <= 0:
                return None
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._items:
                return None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._subscriber.forget(self)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Subscriber:
    """The gateway's one pub/sub connection; ``await open(request_id)`` → an ``Inbox``.

    ``channel`` is this gateway's reply channel (``gateway_id``: a fresh random id by default).
    """

    def __init__(self, redis: Any, gateway_id: str | None = None) -> None:
        self.channel = wire.reply_channel(gateway_id or uuid.uuid4().hex)
        self._key = self.channel.encode()
        self._redis = redis
        self._pubsub: Any = None  # set once the subscription is confirmed
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._inboxes: dict[str, Inbox] = {}
        self._confirmed: asyncio.Future[None] | None = None

    async def open(self, request_id: str) -> Inbox:
        if self._pubsub is None:
            await self.connect()
        if request_id in self._inboxes:
            raise ValueError(f"request id {request_id} is already open")
        inbox = self._inboxes[request_id] = Inbox(self, request_id)
        return inbox

    def forget(self, inbox: Inbox) -> None:
        if self._inboxes.get(inbox.request_id) is inbox:
            del self._inboxes[inbox.request_id]

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._drop(RedisConnectionError("the gateway is shutting down"))

    async def connect(self) -> None:
        """Connect and subscribe to the reply channel, unless that is done already."""
        async with self._connecting:
            if self._pubsub is not None:
                return
            pubsub = self._redis.pubsub()
            self._confirmed = asyncio.get_running_loop().create_future()
            try:
                await pubsub.connect()
                self._reader = asyncio.create_task(self._read(pubsub))
                await pubsub.subscribe(self.channel)
                try:
                    await asyncio.wait_for(asyncio.shield(self._confirmed), SUBSCRIBE_TIMEOUT_S)
                except TimeoutError:
                    raise RedisTimeoutError("Redis did not confirm the SUBSCRIBE") from None
            except BaseException:
                if self._reader is not None:
                    self._reader.cancel()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                raise
            self._pubsub = pubsub

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                # A bounded wait returns None when nothing came. An unbounded one is a plain
                # socket read, which the pool's socket_timeout turns into an error after a quiet
                # spell, failing every open request.
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=READ_WAIT_S)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "message":
                    self._dispatch(message["data"])
                elif (kind == "subscribe" and message.get("channel") == self._key
                      and self._confirmed is not None and not self._confirmed.done()):
                    self._confirmed.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("the pub/sub connection failed: %s; open requests end with an error", exc)
            if self._confirmed is not None and not self._confirmed.done():
                self._confirmed.set_exception(RedisConnectionError(str(exc)))
            if self._pubsub is pubsub:
                await self._drop(exc)

    def _dispatch(self, data: bytes) -> None:
        try:
            events = wire.parse_events(data)
        except ValueError as exc:
            # Whose events they were is unknown; those requests see a gap or a job that ended
            # without its last event, and end with ``events_lost``.
            log.error("an unreadable reply message: %s", exc)
            return
        for request_id, event in events:
            inbox = self._inboxes.get(request_id)
            if inbox is not None:  # else: a request that already ended
                inbox.put(event)

    async def _drop(self, error: BaseException) -> None:
        """Fail every open inbox with ``error``; forget the connection."""
        pubsub, self._pubsub = self._pubsub, None
        inboxes, self._inboxes = self._inboxes, {}
        message = f"lost the Redis pub/sub connection: {error}"
        # One exception object per waiter: each raise extends the traceback of the object it raises.
        for inbox in inboxes.values():
            inbox.put(RedisConnectionError(message))
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
