"""A fake worker for gateway tests: real registry key, real arq worker, real pub/sub, scripted events.

It runs in a thread with its own event loop. The script for a job is picked by the job's text:
the last chat message's content or the first prompt, ``"script:<name>"`` (anything else plays
``hello``). Scripts publish events exactly as a worker would, including the broken sequences a
real worker must never send, so the gateway's defences can be tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from tokenrelay import wire

CONTEXT_LENGTH = 2048
MAX_REQUEST_TOKENS = 1024
PROMPT_TOKENS = 7


class Publisher:
    """Numbers events like a worker does (``seq`` from 0), unless told to skip."""

    def __init__(self, redis: ArqRedis, job: wire.Job) -> None:
        self.redis = redis
        self.channel = job.reply_to
        self.request_id = job.request_id
        self.seq = 0

    async def send(self, build: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        event = build(self.seq, *args, **kwargs)
        await self.redis.publish(self.channel, wire.encode_events([(self.request_id, event)]))
        self.seq += 1


Script = Callable[["ScriptedWorker", Publisher, wire.Job], Awaitable[None]]


def _choice_count(job: wire.Job) -> int:
    return job.n * (len(job.prompts) if job.kind == "completion" and job.prompts else 1)


def _logprobs(job: wire.Job, token: str) -> list[dict[str, Any]] | None:
    if job.sampling.logprobs is None:
        return None
    top = [{"token": t, "logprob": -1.0 - i, "bytes": list(t.encode())}
           for i, t in enumerate([token, "x", "y", "z", "w", "v"][: job.sampling.logprobs])]
    return [{"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": top}]


async def hello(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    """Every choice says "Hello world", in two deltas carrying all choices at once."""
    count = _choice_count(job)
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=PROMPT_TOKENS)
    for text, finish in (("Hello", None), (" world", "stop")):
        choices = [wire.choice_delta(i, text, tokens=1, finish_reason=finish,
                                     logprobs=_logprobs(job, text)) for i in range(count)]
        await pub.send(wire.delta_event, choices)
    await pub.send(wire.done_event, prompt_tokens=PROMPT_TOKENS, completion_tokens=2 * count)


async def echo_job(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    """Answers with the job as the worker received it, to check the request → job mapping."""
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=1)
    text = json.dumps(job.to_dict())
    await pub.send(wire.delta_event, [wire.choice_delta(0, text, tokens=1, finish_reason="stop")])
    await pub.send(wire.done_event, prompt_tokens=1, completion_tokens=1)


async def error_first(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    await pub.send(wire.error_event, status=400, message="This model's maximum context length is 2048.",
                   type_="invalid_request_error", param="messages", code="context_length_exceeded")


async def error_mid(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=PROMPT_TOKENS)
    await pub.send(wire.delta_event, [wire.choice_delta(0, "partial", tokens=1)])
    await pub.send(wire.error_event, status=500, message="the engine failed", code="engine_error")


async def gap(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=PROMPT_TOKENS)
    pub.seq += 1  # event 1 "lost"
    await pub.send(wire.delta_event, [wire.choice_delta(0, "after the gap", tokens=1)])
    await pub.send(wire.done_event, prompt_tokens=PROMPT_TOKENS, completion_tokens=1)


async def no_done(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    """The arq job finishes without the final event."""
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=PROMPT_TOKENS)
    await pub.send(wire.delta_event, [wire.choice_delta(0, "and then nothing", tokens=1)])


async def ghost(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    """Started by a worker whose registry key then vanishes, as after SIGKILL + TTL; then silence."""
    ghost_id = f"ghost-{uuid.uuid4().hex[:8]}"
    info = wire.WorkerInfo(ghost_id, job.model, 1, CONTEXT_LENGTH, MAX_REQUEST_TOKENS, time.time())
    await pub.redis.set(wire.worker_key(ghost_id), info.to_json(), ex=30)
    await pub.send(wire.started_event, worker_id=ghost_id, prompt_tokens=PROMPT_TOKENS)
    await pub.redis.delete(wire.worker_key(ghost_id))
    await worker.until_cancelled(job.request_id, 30)


async def slow(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    """A tick every 0.1 s until the gateway cancels it."""
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=PROMPT_TOKENS)
    for _ in range(300):
        if job.request_id in worker.cancelled:
            return
        await pub.send(wire.delta_event, [wire.choice_delta(0, "tick ", tokens=1)])
        await asyncio.sleep(0.1)


async def pause(worker: ScriptedWorker, pub: Publisher, job: wire.Job) -> None:
    """Silent for 1.2 s after starting (longer than the test gateway's keep-alive), then hello."""
    await pub.send(wire.started_event, worker_id=worker.worker_id, prompt_tokens=PROMPT_TOKENS)
    await asyncio.sleep(1.2)
    await pub.send(wire.delta_event, [wire.choice_delta(0, "late", tokens=1, finish_reason="stop")])
    await pub.send(wire.done_event, prompt_tokens=PROMPT_TOKENS, completion_tokens=1)


SCRIPTS: dict[str, Script] = {
    "hello": hello, "echo-job": echo_job, "error-first": error_first, "error-mid": error_mid, "gap": gap,
    "no-done": no_done, "ghost": ghost, "slow": slow, "pause": pause,
}


def _script_name(job: wire.Job) -> str:
    if job.messages:
        text = str(job.messages[-1].get("content") or "")
    else:
        first = (job.prompts or [""])[0]
        text = first if isinstance(first, str) else ""
    return text.removeprefix("script:") if text.startswith("script:") else "hello"


class ScriptedWorker:
    """Serves ``model`` from a background thread until ``stop()``."""

    def __init__(self, redis_url: str, model: str) -> None:
        self.redis_url = redis_url
        self.model = model
        self.worker_id = f"scripted-{uuid.uuid4().hex[:8]}"
        self.jobs: list[wire.Job] = []
        self.cancelled: set[str] = set()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> ScriptedWorker:
        self._thread.start()
        if not self._ready.wait(15):
            raise TimeoutError("scripted worker did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    async def until_cancelled(self, request_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while request_id not in self.cancelled and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _generate(self, ctx: dict[str, Any], payload: dict[str, Any]) -> None:
        job = wire.Job.from_dict(payload)
        self.jobs.append(job)
        await SCRIPTS[_script_name(job)](self, Publisher(ctx["redis"], job), job)

    async def _heartbeat(self, redis: ArqRedis) -> None:
        info = wire.WorkerInfo(self.worker_id, self.model, capacity=100, context_length=CONTEXT_LENGTH,
                               max_request_tokens=MAX_REQUEST_TOKENS, started_at=time.time())
        while True:
            await redis.set(wire.worker_key(self.worker_id), info.to_json(), ex=int(wire.WORKER_TTL_S))
            await asyncio.sleep(wire.HEARTBEAT_INTERVAL_S)

    async def _listen_for_cancels(self, redis: ArqRedis) -> None:
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(wire.CANCEL_CHANNEL)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    self.cancelled.add(message["data"].decode())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        redis = await create_pool(RedisSettings.from_dsn(self.redis_url), job_serializer=wire.serialize_job,
                                  job_deserializer=wire.deserialize_job)
        worker = Worker(
            functions=[func(self._generate, name=wire.GENERATE_FUNCTION, max_tries=1)],
            queue_name=wire.queue_name(self.model),
            redis_pool=redis,
            max_jobs=100,
            poll_delay=0.01,
            handle_signals=False,
            keep_result=60,
            log_results=False,
            job_serializer=wire.serialize_job,
            job_deserializer=wire.deserialize_job,
        )
        tasks = [asyncio.create_task(c) for c in
                 (self._heartbeat(redis), self._listen_for_cancels(redis), worker.async_run())]
        await asyncio.sleep(0.2)  # first heartbeat written, subscriptions in place
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await redis.delete(wire.worker_key(self.worker_id))
            await redis.aclose(close_connection_pool=True)  # not worker.close(): it calls a deprecated close


@contextlib.contextmanager
def scripted_worker(redis_url: str, model: str) -> Iterator[ScriptedWorker]:
    worker = ScriptedWorker(redis_url, model).start()
    try:
        yield worker
    finally:
        worker.stop()
