"""Putting jobs on their arq queues: each in one script, all of a loop turn's in one round trip.

arq's own ``enqueue_job`` takes three round trips (WATCH, EXISTS, MULTI/EXEC), and the gateway
added two more (ZCARD for ``--max-queue-length``, PUBLISH to wake a worker). Under load each
round trip waits for a turn of a busy event loop, so those five were most of a request's time
before a worker saw it. This script does the same checks and writes atomically, in arq's own
format (``arq.jobs.serialize_job`` with the wire serializer), so arq's workers take the job as if
``enqueue_job`` had written it.

A burst of requests is enqueued in few pipelines, not one call each (``tokenrelay.batching``):
the jobs that wait while a pipeline is out go together in the next one. A call each also took a
pooled connection each: the first burst of 32 requests opened one for most of them (a connect and
redis-py's setup commands, on a busy loop), and its jobs reached a worker ~30 ms late
(docs/benchmarks-notes.md).
"""

from __future__ import annotations

import hashlib
from typing import Any

from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.exceptions import NoScriptError

from tokenrelay import wire
from tokenrelay.batching import Batcher

# KEYS: queue (sorted set), job key, result key.
# ARGV: job id, serialized job, expiry ms, score, queue limit (0 = none), wake channel.
# Returns {1, 0} enqueued, {0, waiting} queue full, {-1, 0} the id is taken.
_SCRIPT = """
local limit = tonumber(ARGV[5])
if limit > 0 then
  local waiting = redis.call('ZCARD', KEYS[1])
  if waiting >= limit then return {0, waiting} end
end
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return {-1, 0} end
redis.call('PSETEX', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('PUBLISH', ARGV[6], '')
return {1, 0}
"""
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()

ENQUEUED, QUEUE_FULL, ID_TAKEN = 1, 0, -1


class Enqueuer:
    """``await enqueuer(job, expires_s, max_queue_length)`` → (outcome, jobs waiting).

    Each job is its own script call, so one job's refusal (queue full, id taken) or failure
    leaves the others of its pipeline as they are. A caller that is cancelled while it waits may
    still have its job enqueued, as with any call whose reply never came.
    """

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        # One job's EVALSHA arguments (numkeys, keys, args) → its script's reply.
        self._batcher: Batcher[list[Any], Any] = Batcher(self._send)

    async def __call__(self, job: wire.Job, expires_s: float, max_queue_length: int) -> tuple[int, int]:
        now = timestamp_ms()
        payload = serialize_job(wire.GENERATE_FUNCTION, (job.to_dict(),), {}, None, now,
                                serializer=wire.serialize_job)
        queue = wire.queue_name(job.model)
        call = [3, queue, wire.arq_job_key(job.request_id), wire.arq_result_key(job.request_id),
                job.request_id, payload, max(1, int(expires_s * 1000)), now, max_queue_length,
                wire.wake_channel(job.model)]
        reply = await self._batcher.call(call)
        return int(reply[0]), int(reply[1])

    async def _send(self, calls: list[list[Any]]) -> list[Any]:
        replies = await self._run(calls)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its scripts (a restart, SCRIPT FLUSH): load it, run those again.
            await self._redis.script_load(_SCRIPT)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            for i, reply in zip(again, await self._run([calls[i] for i in again]), strict=True):
                replies[i] = reply
        return replies

    async def _run(self, calls: list[list[Any]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(_SHA, *call)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
