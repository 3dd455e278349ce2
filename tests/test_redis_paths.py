"""The Redis scripts and the shared subscription, against a real Redis: the one-round-trip
enqueue, the gateway's single pub/sub connection, and the worker's batched claim."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import Job as ArqJob
from arq.jobs import JobStatus
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.enqueue import ENQUEUED, ID_TAKEN, QUEUE_FULL, Enqueuer
from gateway.subscriber import Subscriber
from tokenrelay import wire
from worker.queue import BatchWorker


def _job(model: str) -> wire.Job:
    return wire.Job.from_dict({"request_id": f"chatcmpl-{uuid.uuid4().hex}", "model": model, "kind": "chat",
                               "deadline": time.time() + 30,
                               "messages": [{"role": "user", "content": "hi"}]})


def _run(redis_url: str, body: Callable[[ArqRedis], Awaitable[None]]) -> None:
    async def main() -> None:
        pool = ArqRedis.from_url(redis_url)
        try:
            await body(pool)
        finally:
            await pool.aclose()

    asyncio.run(main())


def test_enqueue_writes_an_arq_job_and_wakes_workers(redis_url: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"

    async def body(pool: ArqRedis) -> None:
        wake = pool.pubsub()
        await wake.subscribe(wire.wake_channel(model))
        await wake.get_message(timeout=1)  # the subscribe confirmation
        job = _job(model)
        assert await Enqueuer(pool)(job, 30.0, 0) == (ENQUEUED, 0)
        # arq reads it as its own: queued, with our payload, expiring at the queue deadline.
        arq_job = ArqJob(job.request_id, pool, _queue_name=wire.queue_name(model),
                         _deserializer=wire.deserialize_job)
        assert await arq_job.status() == JobStatus.queued
        info = await arq_job.info()
        assert info is not None and info.function == wire.GENERATE_FUNCTION
        assert wire.Job.from_dict(info.args[0]) == job
        assert 29_000 < await pool.pttl(wire.arq_job_key(job.request_id)) <= 30_000
        message = await wake.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None and message["channel"] == wire.wake_channel(model).encode()
        # The same id again is refused and changes nothing.
        assert await Enqueuer(pool)(job, 30.0, 0) == (ID_TAKEN, 0)
        assert await pool.zcard(wire.queue_name(model)) == 1
        await wake.aclose()

    _run(redis_url, body)


def test_enqueue_refuses_a_full_queue_with_its_length(redis_url: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"

    async def body(pool: ArqRedis) -> None:
        enqueue = Enqueuer(pool)
        assert (await enqueue(_job(model), 30.0, 2))[0] == ENQUEUED
        assert (await enqueue(_job(model), 30.0, 2))[0] == ENQUEUED
        refused = _job(model)
        assert await enqueue(refused, 30.0, 2) == (QUEUE_FULL, 2)
        assert not await pool.exists(wire.arq_job_key(refused.request_id))
        assert await pool.zcard(wire.queue_name(model)) == 2

    _run(redis_url, body)


def test_one_connection_carries_every_subscription(redis_url: str) -> None:
    async def body(pool: ArqRedis) -> None:
        subscriber = Subscriber(pool)
        channels = [f"test:{uuid.uuid4().hex}" for _ in range(5)]
        inboxes = await asyncio.gather(*(subscriber.subscribe(c) for c in channels))
        for i, channel in enumerate(channels):
            assert await pool.publish(channel, f"m{i}".encode()) == 1  # exactly one subscriber
        for i, inbox in enumerate(inboxes):
            assert await inbox.get(2.0) == f"m{i}".encode()
            assert await inbox.get(0.0) is None  # nothing else came
        clients = await pool.client_list(_type="pubsub")
        assert len([c for c in clients if c.get("sub") not in ("0", 0)]) == 1
        await inboxes[0].aclose()
        await asyncio.sleep(0.05)
        assert await pool.publish(channels[0], b"late") == 0  # unsubscribed at Redis too
        assert await inboxes[1].get(0.05) is None  # waiting has a timeout
        await subscriber.aclose()

    _run(redis_url, body)


def test_a_lost_connection_fails_open_inboxes_and_the_next_subscribe_reconnects(redis_url: str) -> None:
    async def body(pool: ArqRedis) -> None:
        subscriber = Subscriber(pool)
        inbox = await subscriber.subscribe(f"test:{uuid.uuid4().hex}")
        killer = aioredis.Redis.from_url(redis_url)
        assert await killer.client_kill_filter(_type="pubsub") >= 1
        with pytest.raises(RedisConnectionError):
            await inbox.get(5.0)  # an error, not a silent wait
        channel = f"test:{uuid.uuid4().hex}"
        again = await subscriber.subscribe(channel)
        await killer.publish(channel, b"after")
        assert await again.get(2.0) == b"after"
        await killer.aclose()
        await subscriber.aclose()

    _run(redis_url, body)


def test_batch_claim_takes_only_free_due_jobs_up_to_its_room(redis_url: str) -> None:
    queue = f"test:queue:{uuid.uuid4().hex[:8]}"
    started: list[str] = []
    release = asyncio.Event()

    async def hold(ctx: dict[str, Any], *_: Any) -> None:
        started.append(ctx["job_id"])
        await release.wait()

    async def body(pool: ArqRedis) -> None:
        ids = [f"j{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
        for job_id in ids:
            await pool.enqueue_job("hold", _job_id=job_id, _queue_name=queue)
        await pool.psetex(wire.arq_in_progress_key(ids[0]), 60_000, b"1")  # another worker has it
        worker = BatchWorker(functions=[func(hold, name="hold")], queue_name=queue, redis_pool=pool,
                             redis_settings=RedisSettings(), max_jobs=2, poll_delay=0.01, burst=True,
                             handle_signals=False)
        await worker.start_jobs([i.encode() for i in ids])
        assert sorted(worker.tasks) == sorted(ids[1:3])  # the held one passed over, room for two
        for job_id in ids[1:3]:
            assert await pool.exists(wire.arq_in_progress_key(job_id))
        assert not await pool.exists(wire.arq_in_progress_key(ids[3]))
        await worker.start_jobs([i.encode() for i in ids])  # full: takes nothing more
        assert len(worker.tasks) == 2
        await asyncio.sleep(0.1)
        assert sorted(started) == sorted(ids[1:3])
        release.set()
        await asyncio.gather(*worker.tasks.values())
        await worker.close()

    _run(redis_url, body)
