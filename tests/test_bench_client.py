"""The load generator's HTTP/1.1 client against a loopback server that answers canned bytes,
sent in pieces as small as one byte, so every parser state is entered with partial input."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bench.http1 import Connection, HTTPError

SSE = b'data: {"a": 1}\n\ndata: {"b": "x\xc3\xa9"}\n\ndata: [DONE]\n\n'


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        out += f"{size:x}\r\n".encode() + body[pos:pos + size] + b"\r\n"
        pos += size
    assert pos == len(body)
    return out + b"0\r\n\r\n"


STREAM = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
          + chunked(SSE, [10, 1, 30, len(SSE) - 41]))
REFUSED = b'HTTP/1.1 404 Not Found\r\ncontent-length: 21\r\n\r\n{"error": "no model"}'


@asynccontextmanager
async def server(answers: list[bytes], piece: int, close_after: bool = False) -> AsyncIterator[tuple[str, list[int]]]:
    """Answers each request on a connection with the next canned answer, ``piece`` bytes at a time."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                answer = answers.pop(0)
                for i in range(0, len(answer), piece):
                    writer.write(answer[i:i + piece])
                    await writer.drain()
                    await asyncio.sleep(0)
                if close_after:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", connections
    finally:
        srv.close()


def collect() -> tuple[list[bytes], Callable[[bytes], None]]:
    lines: list[bytes] = []
    return lines, lines.append


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_chunked_stream_then_refusal_on_one_connection(piece: int) -> None:
    async def go() -> None:
        async with server([STREAM, REFUSED], piece) as (url, connections):
            conn = Connection(url)
            lines, on_line = collect()
            assert await conn.post_json("/chat/completions", {"x": 1}, on_line) == (200, b"")
            assert lines == SSE.split(b"\n")[:-1]
            lines.clear()
            assert await conn.post_json("/chat/completions", {}, on_line) == (404, b'{"error": "no model"}')
            assert lines == []  # a refusal's body is returned, not handed over as lines
            assert len(connections) == 1  # kept alive
            conn.close()

    asyncio.run(go())


def test_body_ended_by_close_and_reconnect() -> None:
    until_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\ndata: 1\n\ndata: 2"

    async def go() -> None:
        async with server([until_close, STREAM], 5, close_after=True) as (url, connections):
            conn = Connection(url)
            lines, on_line = collect()
            assert (await conn.post_json("/x", {}, on_line))[0] == 200
            assert lines == [b"data: 1", b"", b"data: 2"]  # the last line has no line end
            assert (await conn.post_json("/x", {}, on_line))[0] == 200
            assert len(connections) == 2
            conn.close()

    asyncio.run(go())


def test_a_stream_cut_mid_chunk_is_an_error() -> None:
    async def go() -> None:
        async with server([STREAM[:-20]], 3, close_after=True) as (url, _):
            conn = Connection(url)
            with pytest.raises(HTTPError, match="connection closed"):
                await conn.post_json("/x", {}, collect()[1])

    asyncio.run(go())


def test_a_line_handler_error_ends_the_request() -> None:
    def on_line(line: bytes) -> None:
        if line.startswith(b"data: [DONE]"):
            raise RuntimeError("handler says no")

    async def go() -> None:
        async with server([STREAM], 4096) as (url, _):
            conn = Connection(url)
            with pytest.raises(RuntimeError, match="handler says no"):
                await conn.post_json("/x", {}, on_line)

    asyncio.run(go())


def test_waves_prints_each_wave_of_each_rep_and_their_mean() -> None:
    """``bench.waves`` on a real ``tokenrelay up``: every wave's spread, every rep's p50 / p99,
    and their means."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") and k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.waves", "--reps", "2", "--users", "3", "--requests-per-user", "2",
         "--max-tokens", "4"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reps = re.findall(r"^w0: (\d+)/(\d+)/(\d+) \| w1: (\d+)/(\d+)/(\d+) \|\| p50 ([\d.]+) p99 ([\d.]+)$",
                      done.stdout, re.MULTILINE)
    assert len(reps) == 2, done.stdout
    for rep in reps:
        w0, w1 = [int(x) for x in rep[:3]], [int(x) for x in rep[3:6]]
        assert 0 < w0[0] <= w0[1] <= w0[2] and 0 < w1[0] <= w1[1] <= w1[2]
        # The waves print whole milliseconds, the percentiles tenths.
        assert min(w0[0], w1[0]) - 1 <= float(rep[6]) <= float(rep[7]) <= max(w0[2], w1[2]) + 1
    mean = re.search(r"^mean of 2 reps: p50 ([\d.]+) ms, p99 ([\d.]+) ms$", done.stdout, re.MULTILINE)
    assert mean is not None, done.stdout
    assert abs(float(mean.group(1)) - (float(reps[0][6]) + float(reps[1][6])) / 2) < 0.11
