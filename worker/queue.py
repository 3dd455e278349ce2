"""arq, tuned for a worker that holds many jobs at once and must start new ones at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from arq.constants import abort_jobs_ss
from arq.jobs import deserialize_job_raw, serialize_result
from arq.utils import ms_to_datetime, timestamp_ms, to_ms
from arq.worker import JobExecutionFailed, Worker

from tokenrelay import wire
from tokenrelay.batching import Batcher

log = logging.getLogger("tokenrelay.worker")

# A job to finish: id, finished (else left queued for another try), result record or None, and
# its expiry in seconds (None: kept forever).
_Finishing = tuple[str, bool, "bytes | None", "float | None"]

# How long arq keeps a job's try counter (arq.worker.run_job's own figure).
_RETRY_KEY_TTL_S = 88400

# KEYS: the queue. ARGV: now (ms), in-progress TTL (ms), most jobs to take, most queued ids to
# read, then the key prefixes: in-progress, job, try counter, cancel marker.
# arq's poll, claim and fetch for many jobs in one round trip. A job is taken when it is due and
# no worker holds it (arq's in-progress key), atomically, so two workers never take one job.
# Ids held elsewhere are passed over, so a free row never starves behind them. For each job
# taken: id, score, payload ('' when its key expired), try number, cancel marker present (0/1).
# The keys are built inside the script from the ids it reads, so this needs one Redis, not a
# Redis Cluster (arq's queue is one sorted set anyway).
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
local room = tonumber(ARGV[3])
local taken = {}
for i = 1, #ids, 2 do
  if room <= 0 then break end
  local id = ids[i]
  local in_progress = ARGV[5] .. id
  if redis.call('EXISTS', in_progress) == 0 then
    redis.call('PSETEX', in_progress, ARGV[2], '1')
    local retry = ARGV[7] .. id
    local try = redis.call('INCR', retry)
    redis.call('EXPIRE', retry, ARGV[9])
    local payload = redis.call('GET', ARGV[6] .. id) or ''
    table.insert(taken, {id, ids[i + 1], payload, try, redis.call('EXISTS', ARGV[8] .. id)})
    room = room - 1
  end
end
return taken
"""


class BatchWorker(Worker):  # type: ignore[misc]  # arq is not type-checked here (pyproject)
    """arq's Worker, with its poll, claim and job start done for all new jobs in one round trip.

    arq polls with ZRANGEBYSCORE, claims each id with a WATCH/EXISTS/ZSCORE/MULTI transaction
    (four round trips per queued id, the running ones included), then fetches each job in one
    more pipeline, and its ``run_job`` starts two more tasks and logs the payload. Under load
    each round trip waits for a turn of a busy event loop, so a new request waited several turns
    before it reached the engine. Here one script (``_CLAIM``) does arq's checks and writes and
    returns the jobs, with their try numbers and whether the gateway has cancelled them
    (``ctx["cancelled"]``), and ``_run_claimed`` runs each with arq's result and cleanup.

    A job holds one of ``capacity`` places (the engine's rows) only until it calls
    ``ctx["release"]()`` (or ends): writing its result to Redis afterwards takes one of arq's
    ``max_jobs`` slots but no place. Under a closed loop a user's next request arrives while the
    previous job is still writing its result; counting that job as busy made the new one wait
    for that round trip and the next wake-up.

    Keyword arguments are arq's ``Worker``'s, plus ``capacity`` (default: ``max_jobs``, which
    should then leave room above it) and ``on_release``, called after each release. Jobs still
    end in arq's format (result key, in-progress key deleted, removed from the queue), so arq's
    ``Job.status()`` reads them.
    """

    def __init__(self, *args: Any, capacity: int | None = None, on_release: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity: int = self.max_jobs if capacity is None else capacity
        self.holding = 0  # jobs claimed and not yet released
        self._on_release = on_release
        self._claim_script: Any = None  # registered once arq has its Redis pool
        self._claiming = asyncio.Lock()  # a wake-up's claim and arq's timer poll may overlap
        self._finisher: Batcher[_Finishing, None] = Batcher(self._finish)

    async def claim(self) -> None:
        """Take every due job this worker has room for, and start them."""
        async with self._claiming:
            room = min(self.capacity - self.holding, self.max_jobs - self.job_counter)
            if room <= 0:
                return
            if self._claim_script is None:
                self._claim_script = self.pool.register_script(_CLAIM)
            taken = await self._claim_script(
                keys=[self.queue_name],
                args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), room, self.queue_read_limit,
                      wire.arq_in_progress_key(""), wire.arq_job_key(""), wire.arq_retry_key(""),
                      wire.cancel_marker_key(""), _RETRY_KEY_TTL_S],
            )
            for raw_id, score, payload, job_try, cancelled in taken:
                job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                await self.sem.acquire()  # never waits: ``room`` counted the free slots
                self.job_counter += 1
                self.holding += 1
                task = self.loop.create_task(
                    self._run_claimed(job_id, int(float(score)), payload, int(job_try), bool(cancelled)))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq's own callers pass the ids they read; the script reads the queue itself.
        await self.claim()

    async def _poll_iteration(self) -> None:
        """arq's timer poll (arq 0.28, pinned): claim, forget finished tasks, record health."""
        if self.allow_pick_jobs:
            await self.claim()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # an error in _run_claimed itself surfaces here, as in arq
        await self.heart_beat()

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None, result_timeout_s: float | None,
                         keep_result_forever: bool, incr_score: int | None, keep_in_progress: float | None) -> None:
        """arq's ``finish_job``, for all the jobs that end in one turn of the loop in one
        transaction. Under a closed loop a whole batch of jobs ends in one engine step, just as
        their users' next requests arrive; a transaction per job cost the worker's loop ~100 µs
        each (redis-py's pipeline, not Redis), in the time the next requests wait for it."""
        if incr_score or keep_in_progress is not None:  # arq's retry paths, which this worker doesn't take
            await super().finish_job(job_id, finish, result_data, result_timeout_s, keep_result_forever,
                                     incr_score, keep_in_progress)
            return
        expire_s = None if keep_result_forever else result_timeout_s
        await self._finisher.call((job_id, finish, result_data, expire_s))

    async def _finish(self, batch: list[_Finishing]) -> list[Exception | None]:
        finished = [job_id for job_id, finish, *_ in batch if finish]
        async with self.pool.pipeline(transaction=True) as tr:
            for job_id, _, result_data, expire_s in batch:
                if result_data:
                    tr.set(wire.arq_result_key(job_id), result_data, px=to_ms(expire_s))
            if finished:
                tr.zrem(abort_jobs_ss, *finished)
                tr.zrem(self.queue_name, *finished)
            tr.delete(*[wire.arq_in_progress_key(job_id) for job_id, *_ in batch],
                      *[key for job_id in finished for key in (wire.arq_retry_key(job_id), wire.arq_job_key(job_id))])
            await tr.execute()
        return [None] * len(batch)

    async def close(self) -> None:
        # A job cancelled at shutdown leaves its last transaction to the finisher: let it go out
        # before arq closes the pool. arq's own close would re-raise a cancelled job's
        # CancelledError and skip closing the pool, so the ended tasks are forgotten first.
        if self._pool is not None:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            self.tasks.clear()
            await self._finisher.flushed()
        await super().close()

    async def _run_claimed(self, job_id: str, score: int, payload: bytes, job_try: int, cancelled: bool) -> None:
        """arq's ``run_job`` for a job already fetched: one log line per job, where arq wrote two
        with the payload's repr."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.holding -= 1
                if self._on_release is not None:
                    self._on_release()

        ctx: dict[str, Any] = {**self.ctx, "job_id": job_id, "job_try": job_try, "score": score,
                               "cancelled": cancelled, "release": release}
        try:
            await self._run_job(job_id, payload, ctx)
        finally:
            release()

    async def _run_job(self, job_id: str, payload: bytes, ctx: dict[str, Any]) -> None:
        start_ms = timestamp_ms()
        job_try: int = ctx["job_try"]
        function_name, args, kwargs, enqueue_time_ms = "<unknown>", (), {}, 0
        success = False
        result: Any = None
        function: Any = None
        try:
            if not payload:
                raise JobExecutionFailed("job expired")
            function_name, args, kwargs, _, enqueue_time_ms = deserialize_job_raw(
                payload, deserializer=self.job_deserializer)
            ctx["enqueue_time"] = ms_to_datetime(enqueue_time_ms)
            function = self.functions.get(function_name)
            if function is None:
                raise JobExecutionFailed(f"function {function_name!r} not found")
            timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
            async with asyncio.timeout(timeout_s):
                result = await function.coroutine(ctx, *args, **kwargs)
            success = True
            self.jobs_complete += 1
        except asyncio.CancelledError:
            # The worker is shutting down: leave the job queued, as arq does. Its next try is
            # dropped by the job itself (the gateway has already been told).
            self.jobs_retried += 1
            await asyncio.shield(self.finish_job(job_id, False, None, None, False, None, None))
            raise
        except Exception as exc:
            log.exception("job %s (%s) failed", job_id, function_name)
            result = exc
            self.jobs_failed += 1
        keep_forever = self.keep_result_forever
        keep_s = self.keep_result_s
        if function is not None:
            keep_forever = keep_forever if function.keep_result_forever is None else function.keep_result_forever
            keep_s = keep_s if function.keep_result_s is None else function.keep_result_s
        result_data = None
        if keep_forever or keep_s > 0:
            result_data = serialize_result(
                function_name, args, kwargs, job_try, enqueue_time_ms, success, result, start_ms, timestamp_ms(),
                f"{job_id}:{function_name}", self.queue_name, job_id=job_id, serializer=self.job_serializer)
        await asyncio.shield(self.finish_job(job_id, True, result_data, keep_s, keep_forever, None, None))
        log.info("job %s %s in %.2fs (try %d)", job_id, "done" if success else "failed",
                 (timestamp_ms() - start_ms) / 1000, job_try)
        if self.after_job_end:
            await self.after_job_end(ctx)


class QueueWaker:
    """Claims at once when a gateway announces a job or a job of ours ends (arq only polls on a
    timer). Concurrent claims are safe: a job is claimed atomically by its in-progress key."""

    def __init__(self, worker: BatchWorker) -> None:
        self._worker = worker
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def poke(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # one more claim after the current one, so no wake-up is lost
            return
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._worker.claim()
            except Exception:
                log.exception("claim after wake-up failed")
            if not self._again:
                return
