"""Facts about processes and the machine: a process's resident memory, CPU model, load."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any


def _kib_field(path: str, field: str) -> int | None:
    """A ``Name:  N kB`` line of a /proc file, in KiB; None when the file or the field is gone."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def status_kib(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (``VmRSS``, ``VmHWM``); None when gone."""
    return _kib_field(f"/proc/{pid}/status", field)


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = status_kib(self.pid, "VmRSS")
            if kib is not None:
                self.peak_kib = max(self.peak_kib, kib)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
        info["nproc"] = int(nproc)
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem = status_meminfo("MemTotal")
    if mem:
        info["memory_gib"] = round(mem / 2**20, 1)
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def status_meminfo(field: str) -> int | None:
    return _kib_field("/proc/meminfo", field)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


_TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat), for every process."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK


def process_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (their threads included), seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parts = fh.read().rsplit(")", 1)[1].split()
            total += int(parts[11]) + int(parts[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / _TICK


class ForeignCpu:
    """How much CPU processes other than ``pids()`` used during a block, as % of the machine.

    The benchmark shares its machine; this says how much it was disturbed.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self.percent: float | None = None

    def __enter__(self) -> ForeignCpu:
        self._t = time.monotonic()
        self._busy = busy_cpu_seconds()
        self._start_pids = self._pids()
        self._ours = process_cpu_seconds(self._start_pids)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t
        pids = sorted(set(self._start_pids) | set(self._pids()))
        ours = process_cpu_seconds(pids) - self._ours
        foreign = busy_cpu_seconds() - self._busy - ours
        if wall > 0:
            self.percent = round(max(0.0, foreign) / (wall * (os.cpu_count() or 1)) * 100, 1)


def wait_until_quiet(
    ours: Callable[[], list[int]], limit_pct: float, max_wait_s: float, window_s: float = 2.0
) -> float | None:
    """Wait (at most ``max_wait_s``) until other processes use less than ``limit_pct`` % of the
    CPUs over a ``window_s`` window; returns the last window's figure."""
    deadline = time.monotonic() + max_wait_s
    last: float | None = None
    while True:
        probe = ForeignCpu(ours)
        with probe:
            time.sleep(window_s)
        last = probe.percent
        if last is None or last < limit_pct or time.monotonic() >= deadline:
            return last
