"""``tokenrelay gateway --processes N``: N real uvicorn gateways on one port under one supervisor."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.procs import Proc, child_env, free_port, start_gateway, start_worker, wait_until
from tokenrelay import wire

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="--processes needs Linux")

MODEL = "tiny-procs"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` whose socket ``pid`` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
    return held


def reply_channels(redis_url: str) -> set[bytes]:
    return set(redis.Redis.from_url(redis_url).pubsub_channels(wire.REPLY_CHANNEL_PATTERN))


@pytest.fixture(scope="module")
def worker(redis_url: str, log_dir: Path, tiny_model: Path) -> Iterator[Proc]:
    proc = start_worker(redis_url, log_dir, str(tiny_model), MODEL, "--max-batch-size", "16")
    yield proc
    proc.stop()


def stream_text(base: str) -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                stream=True):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    return text


def test_processes_share_the_port_and_a_dead_one_is_replaced(worker: Proc, redis_url: str, log_dir: Path) -> None:
    before = reply_channels(redis_url)
    gateway, base = start_gateway(redis_url, log_dir, {"TOKENRELAY_PROCESSES": "2"})
    supervisor = gateway.popen.pid
    port = int(base.rsplit(":", 1)[1])
    try:
        # Each process subscribes its own reply channel once its app has started.
        wait_until(lambda: len(reply_channels(redis_url) - before) == 2, 30, "two reply channels", gateway.popen)
        first = children(supervisor)
        assert len(first) == 2

        # Kept-alive connections, as the SDKs keep them: the kernel spreads them over both
        # processes (all 16 on one would be a 1-in-32,768 draw).
        clients = [httpx.Client(base_url=base) for _ in range(16)]
        try:
            for c in clients:
                assert c.get("/health").status_code == 200
            held = [connections_held(pid, port) for pid in first]
            assert sum(held) == 16 and min(held) >= 1, held
        finally:
            for c in clients:
                c.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: stream_text(base), range(8)))
        assert len(set(texts)) == 1 and texts[0]  # greedy: every process relays the same answer

        os.kill(first[0], signal.SIGKILL)
        wait_until(lambda: len(children(supervisor)) == 2 and first[0] not in children(supervisor), 15,
                   "a replacement process", gateway.popen)
        replacement = (set(children(supervisor)) - set(first)).pop()
        wait_until(lambda: len(reply_channels(redis_url) - before) >= 2, 30, "the replacement's reply channel")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: stream_text(base), range(8))) == texts
        assert "exited (code -9); starting another" in gateway.log()

        gateway.popen.send_signal(signal.SIGTERM)
        assert gateway.popen.wait(30) == 0
        for pid in (first[1], replacement):
            wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 10, f"process {pid} gone")
    finally:
        gateway.stop()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_port_that_cannot_be_bound_stops_the_supervisor(redis_url: str) -> None:
    port = free_port()
    with socket.socket() as taken:  # listening without SO_REUSEPORT: no one may share it
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "tokenrelay.cli", "gateway", "--port", str(port), "--processes", "2"],
            env=child_env(redis_url), capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "could not bind" in done.stderr
    assert "exited at startup (code 3), 3 times in a row; stopping" in done.stderr
