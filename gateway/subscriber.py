"""Every request's events on one Redis pub/sub connection, read by one task.

A pub/sub connection per request cost, for every request, a TCP connect, the client's handshake
and a disconnect (redis-py closes a PubSub's connection when it is done), each a turn of the event
loop that under load delays the request's first token. Here one connection carries every channel:
``subscribe`` sends SUBSCRIBE and waits for Redis to confirm it (pub/sub drops what is published
before that), and the reader hands each message to its channel's ``Inbox``.

If the connection fails, every open inbox raises that error, so each request ends with an error
rather than waiting; the next ``subscribe`` opens a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0


class Inbox:
    """One channel's messages, in order. ``get`` returns None after ``timeout`` seconds."""

    def __init__(self, subscriber: Subscriber, channel: bytes) -> None:
        self.channel = channel
        self._subscriber = subscriber
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self._closed = False

    def put(self, item: bytes | BaseException) -> None:
        self._queue.put_nowait(item)

    async def get(self, timeout: float) -> bytes | None:
        if self._queue.empty():
            if timeout <= 0:
                return None
            try:
                async with asyncio.timeout(timeout):
                    item = await self._queue.get()
            except TimeoutError:
                return None
        else:
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._subscriber.unsubscribe(self)


class Subscriber:
    """The gateway's one pub/sub connection; ``await subscribe(channel)`` → a confirmed ``Inbox``."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._inboxes: dict[bytes, Inbox] = {}
        self._confirm: dict[bytes, asyncio.Future[None]] = {}

    async def subscribe(self, channel: str) -> Inbox:
        key = channel.encode()
        inbox = Inbox(self, key)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inboxes[key] = inbox
        self._confirm[key] = confirmed
        try:
            pubsub = await self._connection()
            await pubsub.subscribe(channel)
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT_S)
            except TimeoutError:
                raise RedisTimeoutError("Redis did not confirm the SUBSCRIBE") from None
        except BaseException:
            await inbox.aclose()
            raise
        finally:
            self._confirm.pop(key, None)
        return inbox

    async def unsubscribe(self, inbox: Inbox) -> None:
        if self._inboxes.get(inbox.channel) is inbox:
            del self._inboxes[inbox.channel]
            pubsub = self._pubsub
            if pubsub is not None:
                with contextlib.suppress(RedisError, OSError):  # a dead connection has no subscriptions
                    await pubsub.unsubscribe(inbox.channel.decode())

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._drop(RedisConnectionError("the gateway is shutting down"))

    async def _connection(self) -> Any:
        async with self._connecting:
            if self._pubsub is None:
                pubsub = self._redis.pubsub()
                await pubsub.connect()
                self._pubsub = pubsub
                self._reader = asyncio.create_task(self._read(pubsub))
            return self._pubsub

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                if message is None:
                    continue
                kind, channel = message.get("type"), message.get("channel")
                if kind == "message":
                    inbox = self._inboxes.get(channel)
                    if inbox is not None:  # else: a request that already ended
                        inbox.put(message["data"])
                elif kind == "subscribe":
                    confirmed = self._confirm.get(channel)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("the pub/sub connection failed: %s; open requests end with an error", exc)
            if self._pubsub is pubsub:
                await self._drop(exc)

    async def _drop(self, error: BaseException) -> None:
        """Fail every open inbox and pending subscribe with ``error``; forget the connection."""
        pubsub, self._pubsub = self._pubsub, None
        inboxes, self._inboxes = self._inboxes, {}
        message = f"lost the Redis pub/sub connection: {error}"
        # One exception object per waiter: each raise extends the traceback of the object it raises.
        for inbox in inboxes.values():
            inbox.put(RedisConnectionError(message))
        for confirmed in self._confirm.values():
            if not confirmed.done():
                confirmed.set_exception(RedisConnectionError(message))
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
