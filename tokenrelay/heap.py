"""Keeping the garbage collector's full passes short in the long-running processes."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect once, then hide every object alive now from the collector (``gc.freeze``).

    What a process builds before it serves (modules, the model's layers, the app) lives as long
    as the process, yet each full collection walked all of it: a worker paused for ~150 ms and a
    gateway for ~15–30 ms, sometimes in the middle of a wave of requests (docs/benchmarks-notes.md).
    Frozen objects are never scanned again; they stay alive, which they would anyway. The
    collection first keeps garbage that exists now from being frozen with them.
    """
    gc.collect()
    gc.freeze()
