"""arq, tuned for a worker that holds many jobs at once and must start new ones at once."""

from __future__ import annotations

import asyncio
import logging

from arq.worker import Worker

from tokenrelay import wire

log = logging.getLogger("tokenrelay.worker")


class BatchWorker(Worker):  # type: ignore[misc]  # arq is not type-checked here (pyproject)
    """arq's Worker, minus its per-poll cost for jobs that are already running.

    arq keeps a job in the queue until it ends, and each poll re-checks every queued id with a
    WATCH/EXISTS/ZSCORE transaction: with 32 jobs generating, that is ~100 Redis round trips per
    poll, most of the worker's event-loop time. Here ids this worker runs are skipped outright, and
    ids another worker holds are dropped with one pipelined EXISTS; arq's own claim (the WATCHed
    in-progress key) still decides the rest, so two workers never take one job.
    """

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        fresh = [j for j in job_ids if j.decode() not in self.tasks]
        if fresh:
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in fresh:
                    pipe.exists(wire.arq_in_progress_key(job_id.decode()))
                held = await pipe.execute()
            fresh = [j for j, taken in zip(fresh, held, strict=True) if not taken]
        if fresh:
            await super().start_jobs(fresh)


class QueueWaker:
    """Runs arq's poll at once when a gateway announces a job or a job of ours ends.

    arq only polls on a timer; ``_poll_iteration`` is its poll (arq 0.28, pinned). Concurrent
    polls are safe: arq claims each job with a WATCHed in-progress key.
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
