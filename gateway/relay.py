"""One request's trip through Redis: open its inbox, enqueue, then follow the worker's events.

The order matters: Redis pub/sub drops messages published before SUBSCRIBE, so the inbox opens
(on the gateway's confirmed reply channel, gateway/subscriber.py) before the job can reach a worker.

How a request ends when things go wrong, and how fast:

* no worker starts it within ``queue_timeout`` → 503 ``queue_timeout``; the job is withdrawn from
  its arq queue (so it no longer counts toward ``max_queue_length``), and a cancel marker makes a
  worker that took it at that very moment drop it;
* its worker dies (SIGKILL, lost host) → its registry key expires ``wire.WORKER_TTL_S`` after its
  last heartbeat, and the gateway checks that key after each ``LIVENESS_INTERVAL_S`` of silence:
  503 ``worker_lost`` within about WORKER_TTL_S + LIVENESS_INTERVAL_S + FINISH_GRACE_S (~5.3 s);
* an event goes missing (seq gap, or the arq job finished without ``done``/``error``) → 500
  ``events_lost``; a partial answer is never passed off as a complete one.

Whenever a request ends other than by the worker's ``done``/``error`` (client gone, timeout, any
of the above), the worker is told to stop: cancel marker plus a message on ``wire.CANCEL_CHANNEL``;
a job no worker has started yet is also removed from the queue (see ``publish_cancel``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus
from redis.exceptions import RedisError, WatchError

from gateway.enqueue import ENQUEUED, ID_TAKEN, QUEUE_FULL, Enqueuer
from gateway.errors import OpenAIError, queue_full, queue_timeout_error, server_error
from gateway.subscriber import Inbox, Subscriber
from tokenrelay import wire

log = logging.getLogger(__name__)

LIVENESS_INTERVAL_S = 1.0
# The worker publishes its last event before its arq function returns; a finished job whose last
# event we have not read yet gets this long for the message to arrive.
FINISH_GRACE_S = 0.3

Event = dict[str, Any]

# Cleanups run as their own tasks so a cancelled caller cannot interrupt them halfway; the set
# keeps them referenced until they finish.
_cleanups: set[asyncio.Task[None]] = set()


async def _run_shielded(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
    await asyncio.shield(task)


class Relay:
    """Starts requests on the workers; one per app, sharing its Redis pool."""

    def __init__(self, redis: Any, queue_timeout: float, max_queue_length: int = 0) -> None:
        self._redis = redis  # arq.connections.ArqRedis with wire's job (de)serializer
        self.queue_timeout = queue_timeout
        self.max_queue_length = max_queue_length
        self._open: set[EventStream] = set()
        self._enqueue = Enqueuer(redis)
        self._subscriber = Subscriber(redis)

    async def open(self, job: wire.Job) -> EventStream:
        """Open its inbox, enqueue, and return the stream of the job's events. Close it when done."""
        stream = EventStream(self._redis, job, self.queue_timeout)
        self._open.add(stream)
        stream.on_closed = self._open.discard
        try:
            try:
                stream.inbox = await self._subscriber.open(job.request_id)
            except ValueError:
                raise _duplicate(job.request_id) from None
            job = dataclasses.replace(job, reply_to=self._subscriber.channel)
            # A call that fails midway may still have enqueued it: until the answer says otherwise,
            # a worker may hold it, so giving up cancels it.
            stream.enqueued = True
            # Backpressure: a bounded queue answers 429 (the SDKs back off and retry) instead of
            # letting waits grow without limit; the count includes jobs being generated. The
            # script also publishes the wake-up that lets a worker start the job now instead of
            # up to --poll-delay later.
            outcome, waiting = await self._enqueue(job, self.queue_timeout, self.max_queue_length)
            stream.enqueued = outcome == ENQUEUED
            if outcome == QUEUE_FULL:
                raise queue_full(job.model, waiting)
            if outcome == ID_TAKEN:
                raise _duplicate(job.request_id)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def warm_up(self) -> None:
        """Subscribe to the reply channel now, so the first request does not wait for it; a
        Redis that is not up yet is no error here (the first request tries again)."""
        try:
            await self._subscriber.connect()
        except (RedisError, OSError) as exc:
            log.info("reply channel not subscribed at startup: %s", exc)

    async def drain(self, timeout: float) -> None:
        """At shutdown, before the pool closes: give the requests uvicorn just cancelled time
        to tell their workers to stop, so no generation outlives its client."""
        deadline = time.monotonic() + timeout
        while (self._open or _cleanups) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._open:
            log.warning("%d request(s) still open at shutdown", len(self._open))
        await self._subscriber.aclose()


async def publish_cancel(redis: Any, request_id: str, queue_name: str | None = None) -> None:
    """Tell workers to drop ``request_id``: the marker for one that has not picked it up yet,
    the message for one generating it now.

    With ``queue_name`` (the job's arq queue), a job no worker has started yet (arq's in-progress
    key absent) is also withdrawn: removed from the queue and its arq job key deleted, in the
    same transaction, so it stops counting toward ``--max-queue-length``. A worker taking it
    meanwhile changes the watched key; it is then stopped like a running job.
    """
    if queue_name is not None:
        in_progress = wire.arq_in_progress_key(request_id)
        try:
            async with redis.pipeline(transaction=True) as pipe:
                await pipe.watch(in_progress)
                started = bool(await pipe.exists(in_progress))
                pipe.multi()
                if not started:
                    pipe.zrem(queue_name, request_id)
                    pipe.delete(wire.arq_job_key(request_id))
                _queue_cancel(pipe, request_id)
                await pipe.execute()
                return
        except WatchError:
            pass  # a worker took the job between our check and the transaction
    async with redis.pipeline(transaction=False) as pipe:
        _queue_cancel(pipe, request_id)
        await pipe.execute()


def _queue_cancel(pipe: Any, request_id: str) -> None:
    pipe.set(wire.cancel_marker_key(request_id), 1, ex=wire.CANCEL_MARKER_TTL_S)
    pipe.publish(wire.CANCEL_CHANNEL, request_id)


class EventStream:
    """The events of one job, checked: in order, from a live worker, within the deadlines."""

    def __init__(self, redis: Any, job: wire.Job, queue_timeout: float) -> None:
        self.inbox: Inbox | None = None  # set once the reply channel's subscription is confirmed
        self.request_id = job.request_id
        self.worker_id: str | None = None
        self.ended = False  # the worker sent done or error: nothing to cancel
        self.enqueued = False
        self._redis = redis
        self._queue_name = wire.queue_name(job.model)
        self._queue_deadline = time.monotonic() + queue_timeout
        self._queue_timeout = queue_timeout
        self._next_seq = 0
        self._last_heard = time.monotonic()
        self._closed = False
        self.on_closed: Callable[[EventStream], None] = lambda stream: None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """Events up to and including ``done`` or ``error``."""
        if self.ended:
            raise StopAsyncIteration
        event = await self.next()
        assert event is not None  # no timeout given
        return event

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when ``timeout`` seconds pass without one.

        Raises ``OpenAIError`` when the request cannot end well (see the module doc), and Redis
        errors as they come.
        """
        if self.ended:
            raise RuntimeError("the event stream already ended")
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            wait = LIVENESS_INTERVAL_S
            if self.worker_id is None:
                if now >= self._queue_deadline:
                    raise queue_timeout_error(self._queue_timeout)
                wait = min(wait, self._queue_deadline - now)
            if give_up is not None:
                if now >= give_up:
                    return None
                wait = min(wait, give_up - now)
            event = await self._receive(wait)
            if event is not None:
                return self._accept(event)
            if self.worker_id is not None and time.monotonic() - self._last_heard >= LIVENESS_INTERVAL_S:
                problem = await self._liveness_problem()
                if problem is not None:
                    event = await self._receive(FINISH_GRACE_S)
                    if event is not None:
                        return self._accept(event)
                    raise problem
                self._last_heard = time.monotonic()

    async def ready(self) -> Event | None:
        """The next event if it has already arrived, else None at once (no liveness checks)."""
        if self.ended:
            return None
        event = await self._receive(0.0)
        return None if event is None else self._accept(event)

    async def _receive(self, wait: float) -> Event | None:
        assert self.inbox is not None
        return await self.inbox.get(max(wait, 0.0))

    def _accept(self, event: Event) -> Event:
        seq, kind = event.get("seq"), event.get("type")
        if seq != self._next_seq:
            raise _events_lost(f"expected event {self._next_seq}, got {seq}")
        if seq == 0 and kind not in ("started", "error"):
            raise _events_lost(f"the first event was {kind!r}, not 'started'")
        self._next_seq += 1
        self._last_heard = time.monotonic()
        if kind == "started":
            self.worker_id = str(event.get("worker_id"))
        elif kind in ("done", "error"):
            self.ended = True
        return event

    async def _liveness_problem(self) -> OpenAIError | None:
        assert self.worker_id is not None
        if not await self._redis.exists(wire.worker_key(self.worker_id)):
            log.warning("%s: worker %s is gone", self.request_id, self.worker_id)
            return server_error(503, "The worker serving this request stopped responding.", "worker_lost")
        job = ArqJob(self.request_id, self._redis, _queue_name=self._queue_name,
                     _deserializer=wire.deserialize_job)
        # not_found: finished with keep_result=0 (arq deletes the job key and keeps no result)
        if await job.status() in (JobStatus.complete, JobStatus.not_found):
            log.error("%s: job finished without a final event", self.request_id)
            return _events_lost("the worker finished without a final event")
        return None

    async def aclose(self) -> None:
        """Unsubscribe; tell the worker to stop unless it ended the request. Safe to call twice,
        and completes even when the caller is being cancelled."""
        if self._closed:
            return
        self._closed = True
        if self.enqueued and not self.ended:
            await _run_shielded(self._cancel())
        else:  # nothing to tell a worker, and no await that a cancellation could interrupt
            self._forget()

    async def _cancel(self) -> None:
        try:
            log.info("%s: cancelling", self.request_id)
            # Not started by a worker (as far as we know): withdraw it from the queue too.
            queue = self._queue_name if self.worker_id is None else None
            await publish_cancel(self._redis, self.request_id, queue)
        except (RedisError, OSError) as exc:
            log.warning("%s: could not publish the cancel: %s", self.request_id, exc)
        finally:
            self._forget()

    def _forget(self) -> None:
        try:
            if self.inbox is not None:
                self.inbox.close()
        finally:
            self.on_closed(self)


def _duplicate(request_id: str) -> OpenAIError:
    return server_error(500, f"Request id {request_id} is already in use.", "duplicate_request")


def _events_lost(detail: str) -> OpenAIError:
    return server_error(500, f"Events of this request were lost ({detail}); the answer would be incomplete.",
                        "events_lost")
