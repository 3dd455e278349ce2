"""Keeping torch's CPU work on one OpenMP thread team.

libgomp (the OpenMP runtime torch's Linux wheels ship) gives every thread that ever ran a parallel
region its own team of worker threads. Once it manages more threads than there are CPUs, all
teams stop spin-waiting between operators and sleep at once (libgomp's "throttled" spin count),
and waking costs more than an operator of a small model takes. A model loaded by the main thread
and run by the engine thread leaves two teams: on 2 CPUs a SmolLM2 decode step at 8 rows took
58-65 ms in the engine thread against 46-50 ms when one thread did both
(docs/benchmarks-notes.md). So the thread that loaded the model lets its team go before the
engine thread starts.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_OMP_PAUSE_HARD = 2


_found: list[ctypes.CDLL] = []  # only a hit is kept: torch may load libgomp after a first miss


def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (torch's own copy), if any; only Linux says."""
    if _found:
        return _found[0]
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        _found.append(lib)
        return lib
    return None


def release_openmp_threads() -> bool:
    """End the calling thread's OpenMP worker threads (``omp_pause_resource_all``); False when
    the process has no libgomp (another OpenMP runtime, or torch not loaded yet).

    The team comes back by itself if this thread runs a parallel region again.
    """
    lib = _libgomp()
    if lib is None:
        return False
    ok = lib.omp_pause_resource_all(_OMP_PAUSE_HARD) == 0
    if not ok:
        log.debug("omp_pause_resource_all refused (called inside a parallel region?)")
    return bool(ok)
