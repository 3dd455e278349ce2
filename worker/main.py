"""A worker process: load the model, announce it, then take jobs from its model's arq queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from arq.connections import RedisSettings, create_pool
from arq.worker import func
from redis.exceptions import RedisError

from tokenrelay import wire
from tokenrelay.heap import freeze_startup_objects
from tokenrelay.redispool import ConcurrentConnectionPool
from worker.engine import Engine
from worker.loading import Loaded, load
from worker.queue import BatchWorker, QueueWaker
from worker.settings import WorkerSettings
from worker.tasks import Runtime, generate

log = logging.getLogger("tokenrelay.worker")

ARQ_TIMEOUT_MARGIN_S = 30.0


def kv_budget_tokens(settings: WorkerSettings, loaded: Loaded) -> int:
    if settings.kv_cache_tokens:
        return settings.kv_cache_tokens
    return max(1, int(settings.kv_cache_memory * 2**30 / loaded.kv_bytes_per_token))


async def _heartbeat(redis: Any, info: wire.WorkerInfo) -> None:
    key, payload = wire.worker_key(info.worker_id), info.to_json()
    while True:
        await redis.set(key, payload, px=int(wire.WORKER_TTL_S * 1000))
        await asyncio.sleep(wire.HEARTBEAT_INTERVAL_S)


async def _listen(redis: Any, channel: str, on_message: Callable[[str], None]) -> None:
    """Call ``on_message`` with each message on ``channel``; rides out Redis restarts."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    try:
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except (ConnectionError, OSError):
                await asyncio.sleep(0.5)
                continue
            if message and message.get("type") == "message":
                data = message["data"]
                on_message(data.decode() if isinstance(data, bytes) else str(data))
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


async def serve(settings: WorkerSettings, loaded: Loaded, engine: Engine) -> None:
    redis = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=wire.serialize_job,
        job_deserializer=wire.deserialize_job,
    )
    # create_pool waits for Redis (retrying) but builds redis-py's own pool: swap in ours (same
    # settings), which hands out connections without an event-loop turn (tokenrelay/redispool.py).
    plain, redis.connection_pool = redis.connection_pool, ConcurrentConnectionPool.like(redis.connection_pool)
    await plain.disconnect()
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    budget = kv_budget_tokens(settings, loaded)
    info = wire.WorkerInfo(
        worker_id=worker_id,
        model=settings.served_model_name,
        capacity=settings.max_batch_size,
        context_length=loaded.context_length,
        max_request_tokens=min(loaded.context_length, budget),
        started_at=time.time(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
    )
    runtime = Runtime(engine=engine, tokenizer=loaded.tokenizer, redis=redis, worker_id=worker_id,
                      context_length=loaded.context_length, max_request_tokens=info.max_request_tokens,
                      default_temperature=settings.default_temperature, default_top_p=settings.default_top_p,
                      job_timeout=settings.job_timeout)
    waker: QueueWaker | None = None

    async def after_job_end(ctx: dict[str, Any]) -> None:
        # One of arq's slots is free again (they bind only when many jobs are writing their
        # results at once): take the next queued job now rather than at the next tick. arq frees
        # the slot in a done-callback of this very task, so poke just after that has run.
        if waker is not None:
            asyncio.get_running_loop().call_later(0.001, waker.poke)

    worker = BatchWorker(
        # The job ends itself at --job-timeout with a clear error; arq's limit is only a backstop.
        functions=[func(generate, name=wire.GENERATE_FUNCTION, max_tries=1,
                        timeout=settings.job_timeout + ARQ_TIMEOUT_MARGIN_S)],
        queue_name=wire.queue_name(settings.served_model_name),
        redis_pool=redis,
        # A job is only taken when the engine has a free row, so a busy worker leaves the rest
        # in Redis for other workers; jobs past their last event, writing their result, hold
        # no row (up to as many again).
        capacity=settings.max_batch_size,
        max_jobs=2 * settings.max_batch_size,
        on_release=lambda: waker.poke() if waker is not None else None,
        # Read past the jobs other workers are running, or a free row could starve behind them.
        queue_read_limit=4 * settings.max_batch_size,
        poll_delay=settings.poll_delay,
        job_serializer=wire.serialize_job,
        job_deserializer=wire.deserialize_job,
        # No result record: the gateway reads only whether the job still exists, and arq's
        # record would repeat the whole request (its messages) in Redis for every job.
        keep_result=0,
        health_check_interval=60,
        ctx={"runtime": runtime},
        after_job_end=after_job_end,
        log_results=False,
    )
    waker = QueueWaker(worker)
    background = [
        asyncio.create_task(_heartbeat(redis, info)),
        asyncio.create_task(_listen(redis, wire.CANCEL_CHANNEL, runtime.cancel)),
        asyncio.create_task(_listen(redis, wire.wake_channel(settings.served_model_name), lambda _: waker.poke())),
    ]
    log.info("worker %s serving %r on queue %s (batch %d, KV budget %d tokens)", worker_id,
             settings.served_model_name, wire.queue_name(settings.served_model_name), settings.max_batch_size, budget)
    freeze_startup_objects()
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        pass
    finally:
        for task in background:
            task.cancel()
        with contextlib.suppress(Exception):
            await redis.delete(wire.worker_key(worker_id))
        # Redis may already be gone (``up`` stops it last, but a user's may not wait for us).
        with contextlib.suppress(RedisError, OSError):
            await worker.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it exists (not on Windows): the loop's own work per event is a fifth to a
    third of the worker's event-loop CPU per token (docs/benchmarks-notes.md)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(settings: WorkerSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bitsandbytes on the CPU warns once per matmul; one line at load says the same.
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    loaded = load(settings)
    engine = Engine(model=loaded.model, tokenizer=loaded.tokenizer, eos_token_ids=loaded.eos_token_ids,
                    max_batch_size=settings.max_batch_size, kv_cache_tokens=kv_budget_tokens(settings, loaded),
                    prefix_cache_tokens=settings.prefix_cache_tokens,
                    batch_wait=settings.batch_wait_ms / 1000, nice=settings.engine_nice)
    engine.start()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings, loaded, engine))
    finally:
        engine.stop()
