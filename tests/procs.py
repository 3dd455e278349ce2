"""Real processes for the tests: redis-server, the gateway under uvicorn, worker processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port, its data in a temp dir; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: install it (apt-get install redis-server) or set REDIS_URL")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tokenrelay-redis-") as data_dir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", data_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_until(lambda: redis.Redis.from_url(url).ping(), 10, "redis-server", proc)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def child_env(redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env.update({"REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


class Proc:
    """A child process whose output goes to a log file shown when a test fails."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(
            list(args), env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            self.popen.wait(30)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def start_gateway(redis_url: str, log_dir: Path, extra_env: dict[str, str] | None = None) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "tokenrelay.cli", "gateway", "--host", "127.0.0.1", "--port", str(port)],
        child_env(redis_url, extra_env),
        log_dir / f"gateway-{port}.log",
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(base + "/health").status_code == 200, 30, "gateway", proc.popen)
    return proc, base


def start_worker(
    redis_url: str, log_dir: Path, model: str, served_name: str, *extra_args: str,
    extra_env: dict[str, str] | None = None, wait: bool = True,
) -> Proc:
    name = f"worker-{served_name}-{free_port()}"
    proc = Proc(
        [sys.executable, "-m", "tokenrelay.cli", "worker", "--model", model, "--served-model-name", served_name,
         *extra_args],
        child_env(redis_url, extra_env),
        log_dir / f"{name}.log",
    )
    if wait:
        wait_for_workers(redis_url, served_name, 1, proc)
    return proc


def wait_for_workers(redis_url: str, served_name: str, count: int, proc: Proc | None = None,
                     timeout: float = 180) -> None:
    from tokenrelay import wire

    client = redis.Redis.from_url(redis_url)

    def ready() -> bool:
        infos = [wire.WorkerInfo.from_json(v) for k in client.scan_iter(wire.WORKER_KEY_PATTERN)
                 if (v := client.get(k)) is not None]
        return sum(1 for i in infos if i.model == served_name) >= count

    try:
        wait_until(ready, timeout, f"{count} worker(s) for {served_name}", proc.popen if proc else None)
    except Exception:
        if proc is not None:
            print(proc.log()[-5000:])
        raise


@contextlib.contextmanager
def serving(redis_url: str, log_dir: Path, model: str, served_name: str, *worker_args: str) -> Iterator[str]:
    """One worker holding ``model`` as ``served_name`` and one gateway; yields the gateway's base URL."""
    worker = start_worker(redis_url, log_dir, model, served_name, *worker_args)
    try:
        gateway, base = start_gateway(redis_url, log_dir)
        try:
            yield base
        finally:
            gateway.stop()
    finally:
        worker.stop()
