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
from tests.procs import free_port
from tokenrelay import wire
from worker.queue import BatchWorker


def _job(model: str) -> wire.Job:
    return wire.Job.from_dict({"request_id": f"chatcmpl-{uuid.uuid4().hex}", "model": model, "kind": "chat",
                               "deadline": time.time() + 30,
                               "messages": [{"role": "user", "content": "hi"}]})


def _batch_worker(pool: ArqRedis, queue: str, function: Callable[..., Awaitable[Any]], **kwargs: Any) -> BatchWorker:
    """A burst worker that runs ``function`` under its own name, polling every 10 ms."""
    return BatchWorker(functions=[func(function, name=function.__name__)], queue_name=queue, redis_pool=pool,
                       redis_settings=RedisSettings(), poll_delay=0.01, burst=True, handle_signals=False, **kwargs)


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


def test_a_burst_of_enqueues_shares_round_trips_and_connections(redis_url: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"

    async def body(pool: ArqRedis) -> None:
        enqueue = Enqueuer(pool)
        jobs = [_job(model) for _ in range(32)]
        outcomes = await asyncio.gather(*(enqueue(job, 30.0, 20) for job in jobs))
        # Each job is still its own script: the first 20 fit, the others see the queue full.
        assert outcomes == [(ENQUEUED, 0)] * 20 + [(QUEUE_FULL, 20)] * 12
        assert await pool.zcard(wire.queue_name(model)) == 20
        assert all([await pool.exists(wire.arq_job_key(j.request_id)) for j in jobs[:20]])
        # One call each had opened a connection each (redis-py's pool hands each call its own).
        assert len(pool.connection_pool._in_use_connections) == 0
        assert len(pool.connection_pool._available_connections) <= 2

    _run(redis_url, body)


def test_enqueue_loads_its_script_again_after_redis_lost_it(redis_url: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"

    async def body(pool: ArqRedis) -> None:
        enqueue = Enqueuer(pool)
        assert (await enqueue(_job(model), 30.0, 0))[0] == ENQUEUED
        await pool.script_flush()  # what a Redis restart does to the script cache
        outcomes = await asyncio.gather(*(enqueue(_job(model), 30.0, 0) for _ in range(3)))
        assert outcomes == [(ENQUEUED, 0)] * 3
        assert await pool.zcard(wire.queue_name(model)) == 4

    _run(redis_url, body)


def test_a_failed_pipeline_fails_each_of_its_enqueues_with_its_own_error() -> None:
    async def main() -> None:
        port = free_port()  # nothing listens there
        pool = ArqRedis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
        try:
            enqueue = Enqueuer(pool)
            results = await asyncio.gather(*(enqueue(_job("m"), 30.0, 0) for _ in range(3)),
                                           return_exceptions=True)
        finally:
            await pool.aclose()
        assert all(isinstance(r, RedisConnectionError) for r in results)
        assert len({id(r) for r in results}) == 3  # raising one shared object grows its traceback

    asyncio.run(main())


def test_a_cancelled_enqueue_leaves_the_others_of_its_batch_answered(redis_url: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"

    async def body(pool: ArqRedis) -> None:
        enqueue = Enqueuer(pool)
        jobs = [_job(model) for _ in range(3)]
        calls = [asyncio.ensure_future(enqueue(job, 30.0, 0)) for job in jobs]
        await asyncio.sleep(0)  # all three are queued for one pipeline
        calls[1].cancel()
        assert await calls[0] == (ENQUEUED, 0) and await calls[2] == (ENQUEUED, 0)
        with pytest.raises(asyncio.CancelledError):
            await calls[1]
        # Its caller left, but the job was on its way: it is queued, as a relay's cancel expects.
        assert await pool.zcard(wire.queue_name(model)) == 3

    _run(redis_url, body)


def _event(seq: int, text: str) -> dict[str, Any]:
    return wire.delta_event(seq, [wire.choice_delta(0, text, tokens=1)])


def test_one_channel_carries_every_request(redis_url: str) -> None:
    async def body(pool: ArqRedis) -> None:
        subscriber = Subscriber(pool)
        ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(5)]
        inboxes = [await subscriber.open(i) for i in ids]
        # One message, every request's events, as a worker sends them after an engine step.
        message = wire.encode_events([(i, _event(0, f"m{k}")) for k, i in enumerate(ids)] + [(ids[0], _event(1, "n"))])
        assert await pool.publish(subscriber.channel, message) == 1  # exactly one subscriber
        for k, inbox in enumerate(inboxes):
            event = await inbox.get(2.0)
            assert event is not None and event["choices"][0]["text"] == f"m{k}"
        second = await inboxes[0].get(2.0)
        assert second is not None and second["seq"] == 1
        for inbox in inboxes:
            assert await inbox.get(0.0) is None  # nothing else came
        clients = await pool.client_list(_type="pubsub")
        assert len([c for c in clients if c.get("sub") not in ("0", 0)]) == 1
        inboxes[1].close()
        late = [(ids[1], _event(1, "late")), (ids[2], _event(1, "x"))]
        await pool.publish(subscriber.channel, wire.encode_events(late))
        later = await inboxes[2].get(2.0)
        assert later is not None and later["seq"] == 1  # a closed inbox's events are dropped, the rest go on
        with pytest.raises(ValueError):
            await subscriber.open(ids[2])  # an id still open
        await pool.publish(subscriber.channel, b"not json")  # logged and dropped; the reader goes on
        await pool.publish(subscriber.channel, wire.encode_events([(ids[3], _event(1, "y"))]))
        assert (await inboxes[3].get(2.0) or {}).get("seq") == 1
        assert await inboxes[4].get(0.05) is None  # waiting has a timeout
        await subscriber.aclose()

    _run(redis_url, body)


def test_a_lost_pubsub_connection_fails_open_inboxes(redis_url: str) -> None:
    async def body(pool: ArqRedis) -> None:
        subscriber = Subscriber(pool)
        inbox = await subscriber.open(f"chatcmpl-{uuid.uuid4().hex}")
        killer = aioredis.Redis.from_url(redis_url)
        assert await killer.client_kill_filter(_type="pubsub") >= 1
        with pytest.raises(RedisConnectionError):
            await inbox.get(5.0)  # an error, not a silent wait
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        again = await subscriber.open(request_id)  # subscribes again, confirmed
        await killer.publish(subscriber.channel, wire.encode_events([(request_id, _event(0, "after"))]))
        assert (await again.get(2.0) or {}).get("seq") == 0
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
        worker = _batch_worker(pool, queue, hold, max_jobs=2)
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


def test_a_released_job_frees_its_place_before_it_ends(redis_url: str) -> None:
    """capacity counts jobs that generate; one that released its place (its last event is out)
    and is still writing its result does not keep the next job waiting."""
    queue = f"test:queue:{uuid.uuid4().hex[:8]}"
    released, finish = asyncio.Event(), asyncio.Event()
    started: list[str] = []
    pokes: list[int] = []

    async def job(ctx: dict[str, Any], *_: Any) -> None:
        started.append(ctx["job_id"])
        await released.wait()
        ctx["release"]()
        ctx["release"]()  # once only
        await finish.wait()

    async def body(pool: ArqRedis) -> None:
        ids = [f"j{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
        for job_id in ids:
            await pool.enqueue_job("job", _job_id=job_id, _queue_name=queue)
        worker = _batch_worker(pool, queue, job, capacity=1, max_jobs=2, on_release=lambda: pokes.append(1))
        await worker.claim()
        assert len(worker.tasks) == 1 and worker.holding == 1
        await asyncio.sleep(0.05)
        await worker.claim()  # the first still holds the one place
        assert len(worker.tasks) == 1
        released.set()
        await asyncio.sleep(0.05)
        assert worker.holding == 0 and pokes == [1]
        await worker.claim()
        assert sorted(worker.tasks) == sorted(ids)  # the first is still running, writing its result
        await asyncio.sleep(0.05)
        assert started == [started[0], *(i for i in ids if i != started[0])]
        finish.set()
        await asyncio.gather(*worker.tasks.values())
        await asyncio.sleep(0.01)  # arq's done-callbacks
        assert worker.holding == 0 and worker.job_counter == 0
        await worker.close()

    _run(redis_url, body)


def test_claim_hands_over_try_and_cancel_marker_and_ends_jobs_as_arq_does(redis_url: str) -> None:
    queue = f"test:queue:{uuid.uuid4().hex[:8]}"
    seen: dict[str, tuple[int, bool]] = {}

    async def record(ctx: dict[str, Any], *_: Any) -> str:
        seen[ctx["job_id"]] = (ctx["job_try"], ctx["cancelled"])
        return "ok"

    async def body(pool: ArqRedis) -> None:
        plain, cancelled, retried, expired = (f"j{i}-{uuid.uuid4().hex[:6]}" for i in range(4))
        for job_id in (plain, cancelled, retried, expired):
            await pool.enqueue_job("record", _job_id=job_id, _queue_name=queue)
        await pool.set(wire.cancel_marker_key(cancelled), 1, ex=60)
        await pool.set(wire.arq_retry_key(retried), 1, ex=60)  # a worker died on it once
        await pool.delete(wire.arq_job_key(expired))  # its payload expired in the queue
        worker = _batch_worker(pool, queue, record, max_jobs=10, keep_result=60)
        await worker.claim()
        assert sorted(worker.tasks) == sorted([plain, cancelled, retried, expired])
        await asyncio.gather(*worker.tasks.values())
        assert seen == {plain: (1, False), cancelled: (1, True), retried: (2, False)}
        for job_id in (plain, cancelled, retried):
            info = await ArqJob(job_id, pool, _queue_name=queue).result_info()
            assert info is not None and info.success and info.result == "ok"
        failed = await ArqJob(expired, pool, _queue_name=queue).result_info()
        assert failed is not None and not failed.success and "expired" in str(failed.result)
        for job_id in (plain, cancelled, retried, expired):  # arq's cleanup: nothing left queued or held
            assert await ArqJob(job_id, pool, _queue_name=queue).status() == JobStatus.complete
            assert not await pool.exists(wire.arq_in_progress_key(job_id), wire.arq_retry_key(job_id))
        assert await pool.zcard(queue) == 0
        assert (worker.jobs_complete, worker.jobs_failed) == (3, 1)
        await worker.close()

    _run(redis_url, body)


def test_jobs_that_end_together_finish_in_one_transaction(redis_url: str) -> None:
    queue = f"test:queue:{uuid.uuid4().hex[:8]}"
    go = asyncio.Event()

    async def job(ctx: dict[str, Any], *_: Any) -> None:
        await go.wait()

    async def execs(pool: ArqRedis) -> int:
        stats = await pool.info("commandstats")
        return int(stats.get("cmdstat_exec", {}).get("calls", 0))

    async def body(pool: ArqRedis) -> None:
        ids = [f"j{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
        for job_id in ids:
            await pool.enqueue_job("job", _job_id=job_id, _queue_name=queue)
        worker = _batch_worker(pool, queue, job, max_jobs=10, keep_result=0)
        await worker.claim()
        await asyncio.sleep(0.05)
        before = await execs(pool)
        go.set()  # all five end in the same turn of the loop
        await asyncio.gather(*worker.tasks.values())
        assert await execs(pool) - before == 1
        assert worker.jobs_complete == 5
        for job_id in ids:  # arq's cleanup, as its own finish_job does it
            assert await ArqJob(job_id, pool, _queue_name=queue).status() == JobStatus.not_found
            assert not await pool.exists(wire.arq_in_progress_key(job_id), wire.arq_retry_key(job_id),
                                         wire.arq_job_key(job_id), wire.arq_result_key(job_id))
        assert await pool.zcard(queue) == 0
        await worker.close()

    _run(redis_url, body)


def test_a_job_cancelled_at_shutdown_stays_queued_for_another_worker(redis_url: str) -> None:
    queue = f"test:queue:{uuid.uuid4().hex[:8]}"
    started = asyncio.Event()

    async def job(ctx: dict[str, Any], *_: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    async def body(pool: ArqRedis) -> None:
        job_id = f"j-{uuid.uuid4().hex[:6]}"
        await pool.enqueue_job("job", _job_id=job_id, _queue_name=queue)
        worker = _batch_worker(pool, queue, job, max_jobs=10, keep_result=0)
        await worker.claim()
        await started.wait()
        worker.tasks[job_id].cancel()
        await worker.close()  # waits for the job's last transaction
        assert await ArqJob(job_id, pool, _queue_name=queue).status() == JobStatus.queued
        assert not await pool.exists(wire.arq_in_progress_key(job_id))
        assert await pool.exists(wire.arq_job_key(job_id))

    _run(redis_url, body)


def test_jobs_waiting_for_a_cancelled_finisher_do_not_hang(redis_url: str) -> None:
    async def job(ctx: dict[str, Any], *_: Any) -> None:
        pass

    async def body(pool: ArqRedis) -> None:
        worker = _batch_worker(pool, f"test:queue:{uuid.uuid4().hex[:8]}", job)
        waiting = [asyncio.create_task(worker.finish_job(f"j{i}", True, None, None, False, None, None))
                   for i in range(2)]
        await asyncio.sleep(0)  # both queued; the finisher is created and has not run yet
        flusher = worker._finisher._flusher
        assert flusher is not None
        flusher.cancel()
        done, pending = await asyncio.wait(waiting, timeout=2)
        assert not pending and all(task.cancelled() for task in done)

    _run(redis_url, body)


def test_a_quiet_reply_channel_outlasts_the_pools_socket_timeout(redis_url: str) -> None:
    async def main() -> None:
        # The gateway's pool has a socket timeout; a spell without events (a long prefill, a
        # queue wait) must not read as a lost connection.
        pool = ArqRedis.from_url(redis_url, socket_timeout=0.3)
        try:
            subscriber = Subscriber(pool)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            inbox = await subscriber.open(request_id)
            assert await inbox.get(1.5) is None
            await pool.publish(subscriber.channel, wire.encode_events([(request_id, _event(0, "late"))]))
            assert (await inbox.get(2.0) or {}).get("seq") == 0
            await subscriber.aclose()
        finally:
            await pool.aclose()

    asyncio.run(main())


def test_the_pool_never_hands_out_a_connection_with_a_reply_waiting(redis_url: str) -> None:
    """ConcurrentConnectionPool skips redis-py's socket read for an idle connection; a reply that
    arrived after release must still send that connection through redis-py's check."""
    from tokenrelay.redispool import ConcurrentConnectionPool

    async def main() -> None:
        pool = ConcurrentConnectionPool.from_url(redis_url, max_connections=1)
        client = aioredis.Redis(connection_pool=pool)
        try:
            assert await client.echo("first") == b"first"
            connection = await pool.get_connection("ECHO")
            await connection.send_command("ECHO", "stale")  # and never read
            await pool.release(connection)
            await asyncio.sleep(0.1)  # the reply lands in the connection's buffer
            assert await client.echo("fresh") == b"fresh"
            # Many commands at once on a larger pool: each gets its own answer.
            wide = aioredis.Redis(connection_pool=ConcurrentConnectionPool.from_url(redis_url, max_connections=256))
            words = [f"w{i}" for i in range(200)]
            assert await asyncio.gather(*(wide.echo(w) for w in words)) == [w.encode() for w in words]
            await wide.aclose()
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("first_token_after", [0.0, 0.6])
def test_started_goes_with_the_first_token_unless_that_is_slow(
        redis_url: str, tiny_model: Any, first_token_after: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engine import Engine
    from worker.tasks import STARTED_WAIT_S, Runtime

    assert first_token_after == 0.0 or first_token_after > STARTED_WAIT_S + 0.2
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=4,
                    kv_cache_tokens=10_000)
    submit = engine.submit

    def late_submit(*args: Any, **kwargs: Any) -> Awaitable[None]:
        async def later() -> None:
            await asyncio.sleep(first_token_after)  # a prefill that takes this long
            await submit(*args, **kwargs)
        return later()

    engine.start()

    async def warm_up() -> None:  # the first forward's one-time costs stay out of the timing
        async for _ in engine.generate("warm-up", [[1, 2, 3]], n=1, max_tokens=[2],
                                       params=wire.SamplingParams(temperature=0, ignore_eos=True)):
            pass

    asyncio.run(warm_up())
    engine.submit = late_submit  # type: ignore[method-assign]
    channel = wire.reply_channel(uuid.uuid4().hex)
    job = wire.Job.from_dict({**_job("m").to_dict(), "reply_to": channel,
                              "sampling": {"max_tokens": 3, "ignore_eos": True, "temperature": 0}})

    async def body(pool: ArqRedis) -> None:
        runtime = Runtime(engine=engine, tokenizer=tok, redis=pool, worker_id="w1", context_length=4096,
                          max_request_tokens=4096)
        replies = pool.pubsub()
        await replies.subscribe(channel)
        await replies.get_message(timeout=1)  # the subscribe confirmation
        await runtime.run(job.to_dict(), job_try=1)
        messages: list[list[tuple[int, str]]] = []
        while not messages or messages[-1][-1][1] != "done":
            message = await replies.get_message(ignore_subscribe_messages=True, timeout=2)
            assert message is not None, messages
            messages.append([(event["seq"], event["type"]) for _, event in wire.parse_events(message["data"])])
        await replies.aclose()
        if first_token_after == 0.0:  # one message where there were two
            assert messages[0][:2] == [(0, "started"), (1, "delta")]
        else:  # the gateway still hears of its worker soon
            assert messages[0] == [(0, "started")]
        seqs = [seq for events in messages for seq, _ in events]
        assert seqs == list(range(len(seqs)))

    try:
        _run(redis_url, body)
    finally:
        engine.stop()
