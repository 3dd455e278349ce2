"""arq, tuned for a worker that holds many jobs at once and must start new ones at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.utils import timestamp_ms
from arq.worker import Worker

from tokenrelay import wire

log = logging.getLogger("tokenrelay.worker")


# KEYS: the queue, then each job's in-progress key; ARGV: now (ms), in-progress TTL (ms), most
# jobs to take, job ids. arq's claim, for many jobs at once: a job is taken when no worker holds
# it and it is due. Ids held elsewhere are passed over, so a free row never starves behind them.
_CLAIM = """
local taken = {}
local room = tonumber(ARGV[3])
for i = 4, #ARGV do
  if #taken >= 2 * room then break end
  local key = KEYS[i - 2]
  if redis.call('EXISTS', key) == 0 then
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) <= tonumber(ARGV[1]) then
      redis.call('PSETEX', key, ARGV[2], '1')
      table.insert(taken, ARGV[i])
      table.insert(taken, score)
    end
  end
end
return taken
"""


class BatchWorker(Worker):  # type: ignore[misc]  # arq is not type-checked here (pyproject)
    """arq's Worker, with its per-job claim done for all new jobs in one Redis round trip.

    arq keeps a job in the queue until it ends, and each poll re-checks every queued id with a
    WATCH/EXISTS/ZSCORE/MULTI transaction: four round trips per id, so with 32 jobs generating,
    ~100 per poll, and four turns of a busy event loop before a new job starts. Here ids this
    worker runs are skipped outright, and the rest are claimed by one script that makes arq's
    own checks and sets arq's in-progress key, atomically, so two workers never take one job.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim: Any = None  # the script, registered once arq has its Redis pool
        self._claiming = asyncio.Lock()  # the wake-up's poll and arq's own may overlap

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        async with self._claiming:
            room = self.max_jobs - self.job_counter
            fresh = [i for i in (j.decode() for j in job_ids) if i not in self.tasks]
            if not fresh or room <= 0:
                return
            if self._claim is None:
                self._claim = self.pool.register_script(_CLAIM)
            taken = await self._claim(
                keys=[self.queue_name, *(wire.arq_in_progress_key(i) for i in fresh)],
                args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), room, *fresh],
            )
            for k in range(0, len(taken), 2):
                job_id = taken[k].decode() if isinstance(taken[k], bytes) else str(taken[k])
                score = int(float(taken[k + 1]))
                await self.sem.acquire()  # never waits: ``room`` counted the free slots
                self.job_counter += 1
                task = self.loop.create_task(self.run_job(job_id, score))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task


class QueueWaker:
    """Runs arq's poll at once when a gateway announces a job or a job of ours ends.

    arq only polls on a timer; ``_poll_iteration`` is its poll (arq 0.28, pinned). Concurrent
    polls are safe: a job is claimed atomically by its in-progress key.
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def poke(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # one more poll after the current one, so no wake-up is lost
            return
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._worker._poll_iteration()
            except Exception:
                log.exception("poll after wake-up failed")
            if not self._again:
                return
