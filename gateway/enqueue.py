"""Putting a job on its arq queue in one Redis round trip.

arq's own ``enqueue_job`` takes three round trips (WATCH, EXISTS, MULTI/EXEC), and the gateway
added two more (ZCARD for ``--max-queue-length``, PUBLISH to wake a worker). Under load each
round trip waits for a turn of a busy event loop, so those five were most of a request's time
before a worker saw it. This script does the same checks and writes atomically, in arq's own
format (``arq.jobs.serialize_job`` with the wire serializer), so arq's workers take the job as if
``enqueue_job`` had written it.
"""

from __future__ import annotations

from typing import Any

from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from tokenrelay import wire

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

ENQUEUED, QUEUE_FULL, ID_TAKEN = 1, 0, -1


class Enqueuer:
    """``await enqueuer(job, expires_s, max_queue_length)`` → (outcome, jobs waiting)."""

    def __init__(self, redis: Any) -> None:
        self._script = redis.register_script(_SCRIPT)  # EVALSHA, loading the script when Redis lacks it

    async def __call__(self, job: wire.Job, expires_s: float, max_queue_length: int) -> tuple[int, int]:
        now = timestamp_ms()
        payload = serialize_job(wire.GENERATE_FUNCTION, (job.to_dict(),), {}, None, now,
                                serializer=wire.serialize_job)
        queue = wire.queue_name(job.model)
        outcome, waiting = await self._script(
            keys=[queue, wire.arq_job_key(job.request_id), wire.arq_result_key(job.request_id)],
            args=[job.request_id, payload, max(1, int(expires_s * 1000)), now, max_queue_length,
                  wire.wake_channel(job.model)],
        )
        return int(outcome), int(waiting)
