"""The gateway's access log: one line per request when it ends, written in batches off its path.

uvicorn's access log writes its line as a response starts. A stream's response starts when the
worker's first token arrives (gateway/routes.py), so each line's ~15-50 µs of logging sat between
a first token and its client, and under a wave of requests every line delayed the first tokens
of the requests behind it (docs/benchmarks-notes.md). Here a request's end only records its
fields; the lines go to the logging system together, ``FLUSH_AFTER_S`` later, each with the time
its request ended. A line says more than uvicorn's too: how long the request took, and its id.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Scope

FLUSH_AFTER_S = 0.1
# A flood of short requests is logged at once past this many lines, so memory stays bounded.
MAX_PENDING = 1000
FORMAT = '%s - "%s %s HTTP/%s" %s %.3fs %s'

_Line = tuple[float, tuple[object, ...]]  # end (epoch seconds), the format's arguments


class AccessLog:
    """``done(scope, status, started, request_id)`` when a request ends; ``flush()`` at shutdown.

    Lines go to ``logger`` (``tokenrelay.access`` by default) at INFO as ordinary records, so
    logging's own configuration (levels, handlers, format) applies; only their writing waits.
    """

    def __init__(self, logger: logging.Logger | None = None, flush_after: float = FLUSH_AFTER_S) -> None:
        self._logger = logger or logging.getLogger("tokenrelay.access")
        self._flush_after = flush_after
        self._pending: list[_Line] = []
        self._timer: asyncio.TimerHandle | None = None

    def done(self, scope: Scope, status: int | None, started: float, request_id: str) -> None:
        """``started``: ``time.monotonic()`` when the request came in; ``status`` None when no
        response was sent (the client left, or the server stopped, first)."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        path = scope.get("raw_path") or scope.get("path", "").encode()
        query = scope.get("query_string", b"")
        self._pending.append((time.time(), (
            f"{client[0]}:{client[1]}" if client else "-",
            scope.get("method", "-"),
            (path + b"?" + query if query else path).decode("latin-1"),
            scope.get("http_version", "1.1"),
            "-" if status is None else status,
            time.monotonic() - started,
            request_id,
        )))
        if len(self._pending) >= MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_after, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._pending = self._pending, []
        logger = self._logger
        for end, args in lines:
            record = logger.makeRecord(logger.name, logging.INFO, "(access log)", 0, FORMAT, args, None)
            record.created, record.msecs = end, (end - int(end)) * 1000  # when the request ended
            logger.handle(record)
