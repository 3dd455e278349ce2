"""``asyncio.run`` on uvloop when it is installed, as the gateway (uvicorn) and the worker run.

The load generator shares the CPUs with the servers it measures, so its own loop should cost as
little per streamed chunk as theirs; the engine-alone benchmark runs the engine on the loop the
worker uses, so the two differ only by the gateway and the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # Windows
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
