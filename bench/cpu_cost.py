"""CPU time per 1000 streamed tokens, per process, for one load on ``tokenrelay up``.

Latency on these shared 2-CPU machines swings by ±20 % between identical runs; the CPU the gateway
and the worker's event loop spend per token by ~10 %, so an alternating A/B of a change to the
path reads best from it. Runs
``tokenrelay up`` (its own Redis) on a model, one warm-up load, then the measured load, and reads
``/proc`` before and after: the gateway, the worker (its event-loop thread, the engine thread and
everything else, OpenMP workers included), Redis, and this process (the load generator).

    python -m bench.cpu_cost --model /tmp/tiny-llama --users 32 --requests-per-user 8
    python -m bench.cpu_cost --tiny --repeat 3        # the overhead point's tiny random Llama

Run it from the checkout to measure (``cwd`` decides which code ``tokenrelay up`` runs).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import aio
from bench.loadgen import run_load
from bench.peers import free_port

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads, ended ones included) or of one thread."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> dict[str, int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    found: dict[str, int] = {}
    for child in map(int, out):
        with open(f"/proc/{child}/cmdline") as f:
            cmd = f.read().replace("\0", " ")
        for role in ("gateway", "worker", "redis"):
            if role in cmd:
                found[role] = child
    return found


def _engine_tid(worker: int) -> int | None:
    """The worker's engine thread: the oldest thread with its name (its OpenMP workers, cloned
    from it, carry the name too, but come and go)."""
    from worker.engine import THREAD_NAME

    named = []
    for tid in map(int, os.listdir(f"/proc/{worker}/task")):
        try:
            with open(f"/proc/{worker}/task/{tid}/comm") as f:
                if f.read().strip() == THREAD_NAME:
                    named.append(tid)
        except OSError:
            continue  # a thread that just ended
    return min(named) if named else None


def _sample(procs: dict[str, int], engine: int | None) -> dict[str, float]:
    sample = {role: _cpu_s(pid) for role, pid in procs.items()}
    worker = procs["worker"]
    sample["worker event loop"] = _cpu_s(worker, worker)
    if engine is not None:
        sample["worker engine thread"] = _cpu_s(worker, engine)
    times = os.times()
    sample["load generator"] = times.user + times.system
    return sample


def measure(model: str, users: int, requests_per_user: int, max_tokens: int, log: Path) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    argv = [sys.executable, "-m", "tokenrelay.cli", "up", "--model", model, "--served-model-name", "bench",
            "--port", str(port), "--max-batch-size", str(max(users, 1)), "--dtype", "float32"]
    with open(log, "w") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base_url + "/models", timeout=2).json().get("data"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline or up.poll() is not None:
                raise RuntimeError(f"tokenrelay did not start; see {log}")
            time.sleep(0.2)
        extra = {"ignore_eos": True}
        aio.run(run_load(base_url, "bench", min(users, 4), 2, max_tokens, extra_body=extra))  # warm-up
        procs = _children(up.pid)
        engine = _engine_tid(procs["worker"])
        before, start = _sample(procs, engine), time.perf_counter()
        result = aio.run(run_load(base_url, "bench", users, requests_per_user, max_tokens, extra_body=extra))
        after, wall = _sample(procs, engine), time.perf_counter() - start
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(30)
    tokens = result.output_tokens
    per_k = {name: 1e6 * (after[name] - before[name]) / tokens for name in after}
    per_k["worker other threads"] = (per_k["worker"] - per_k["worker event loop"]
                                     - per_k.get("worker engine thread", 0.0))
    per_k["all"] = sum(per_k[name] for name in ("gateway", "worker", "redis", "load generator"))
    per_k["tok/s"] = tokens / wall
    per_k["CPUs busy"] = per_k["all"] * per_k["tok/s"] / 1e6
    return per_k


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_cost", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (safetensors)")
    p.add_argument("--tiny", action="store_true", help="make and use the tiny random Llama of the overhead point")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--requests-per-user", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.models import make_tiny_llama

        model = str(make_tiny_llama(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny-llama"))
    if not model:
        p.error("--model or --tiny")
    order = ["tok/s", "gateway", "worker event loop", "worker engine thread", "worker other threads", "redis",
             "load generator", "all", "CPUs busy"]
    print("CPU-ms per 1000 output tokens; " + " | ".join(order))
    for _ in range(args.repeat):
        per_k = measure(model, args.users, args.requests_per_user, args.max_tokens,
                        Path(tempfile.mkdtemp(prefix="cpu-cost-")) / "tokenrelay.log")
        print(" | ".join(f"{per_k.get(name, 0.0):.2f}" if name == "CPUs busy" else f"{per_k.get(name, 0.0):.0f}"
                         for name in order))


if __name__ == "__main__":
    main()
