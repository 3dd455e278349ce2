"""``--processes N``: N gateway processes on one port, each a plain ``tokenrelay gateway``.

One event loop per process serves every stream of that process, and on a machine with several
CPUs a single process becomes the gateway's limit: under a burst of requests it parses them one
by one while other CPUs wait (docs/benchmarks-notes.md). Each process binds the port with
``SO_REUSEPORT``, and Linux spreads new connections across them by their addresses' hash.
uvicorn's own ``--workers`` shares one listening socket instead, and the first process to wake
takes every connection of a burst (in one measured load, one process held 34 connections and
the other 3): connections are kept alive, so the others stayed idle for as long as those clients
stayed.

The supervisor restarts a process that dies (a gateway holds no state that a restart loses:
its open streams end with it, their clients see the connection close). When the processes of
one slot end ``STARTUP_TRIES`` times in a row within ``STARTUP_S`` of their start, a setting or
the port cannot work: everything stops.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import FrameType

from gateway.settings import GatewaySettings
from tokenrelay.config import ConfigError

log = logging.getLogger("tokenrelay.gateway")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STARTUP_S = 5.0  # a process that ends sooner than this after its start may have failed to start
STARTUP_TRIES = 3  # such ends in a row before the supervisor gives up
POLL_S = 0.2
# Each process drains its streams for GRACEFUL_SHUTDOWN_S (gateway/server.py), then cancels them.
STOP_S = 15.0


def _end_with_parent() -> None:
    """In the child before it runs: SIGTERM when the supervisor dies, even by SIGKILL, so no
    gateway outlives it holding the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Starts ``settings.processes`` gateways with these settings and keeps them running.

    Keyword-only argument: settings (those the processes get, as variables).
    """

    def __init__(self, *, settings: GatewaySettings) -> None:
        if sys.platform != "linux" and settings.processes > 1:
            raise ConfigError("--processes: more than 1 needs Linux, whose SO_REUSEPORT spreads connections "
                              "across the processes")
        self.count = settings.processes
        self._address = f"http://{settings.host}:{settings.port}"
        one = replace(settings, processes=1, reuse_port=True)
        self._env = {**os.environ, **one.to_env()}
        self._argv = [sys.executable, "-m", "tokenrelay.cli", "gateway"]
        self._procs: list[tuple[subprocess.Popen[bytes], float]] = []
        self._stopping = False

    def run(self) -> int:
        """Until SIGTERM or SIGINT (then stop every process: 0) or a failed start (1)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        quick_exits = [0] * self.count  # in a row, per process slot
        try:
            for _ in range(self.count):  # one by one: a failed start still stops those started
                self._procs.append(self._start())
            log.info("serving %s with %d gateway processes: %s", self._address, self.count,
                     " ".join(str(p.pid) for p, _ in self._procs))
            while not self._stopping:
                time.sleep(POLL_S)
                for i, (proc, started) in enumerate(self._procs):
                    code = proc.poll()
                    if code is None or self._stopping:
                        continue
                    quick_exits[i] = quick_exits[i] + 1 if time.monotonic() - started < STARTUP_S else 0
                    if quick_exits[i] >= STARTUP_TRIES:
                        log.error("gateway process %d exited at startup (code %s), %d times in a row; stopping",
                                  proc.pid, code, STARTUP_TRIES)
                        return 1
                    log.warning("gateway process %d exited (code %s); starting another", proc.pid, code)
                    self._procs[i] = self._start()
            return 0
        finally:
            self._stop_all()

    def _start(self) -> tuple[subprocess.Popen[bytes], float]:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which passes on
        # one SIGTERM however often it is pressed (a second SIGINT makes uvicorn skip the app's
        # shutdown, which cancels the generations of the streams it cut).
        proc = subprocess.Popen(self._argv, env=self._env, preexec_fn=_end_with_parent, process_group=0)
        return proc, time.monotonic()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _stop_all(self) -> None:
        for proc, _ in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for proc, _ in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
