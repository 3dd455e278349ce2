"""The gateway's HTTP protocol (gateway/protocol.py) and access log (gateway/accesslog.py).

The protocol is uvicorn's own, driven here with raw request bytes and a transport that records
each socket write, so what goes out in which write is exact; every test that runs the gateway
under uvicorn runs it on a real socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.accesslog import AccessLog
from gateway.protocol import HeadWithBody, HttpProtocol

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


class Recorder(asyncio.Transport):
    """The socket's side of a connection: the bytes of each write, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data: Any) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connect(app: Any, requests: bytes) -> tuple[HttpProtocol, Recorder]:
    """A connection of ``app``'s that has received ``requests``."""
    config = Config(app=app, http=HttpProtocol, log_level="warning", lifespan="off")
    config.load()
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Recorder()
    protocol.connection_made(transport)
    protocol.data_received(requests)
    return protocol, transport


async def _serve(app: Any, requests: bytes, responses: int = 1) -> list[bytes]:
    """Feed ``requests`` to one connection and return its writes once ``responses`` ended."""
    protocol, transport = _connect(app, requests)
    for _ in range(500):
        if b"".join(transport.writes).count(b"HTTP/1.1 ") >= responses and not protocol.tasks:
            break
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.01)  # anything still held would go out by now
    protocol.connection_lost(None)
    return transport.writes


async def _json_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"),
                                                                   (b"content-length", b"12")]})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


def test_a_response_goes_out_in_one_write_with_its_head() -> None:
    writes = asyncio.run(_serve(_json_app, GET))
    assert len(writes) == 1
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-type: application/json" in head
    assert body == b'{"ok": true}'


def test_a_stream_joins_its_head_to_the_first_chunk_only() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    writes = asyncio.run(_serve(app, GET))
    assert len(writes) == 3
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    assert writes[1] == b"9\r\ndata: 2\n\n\r\n"
    assert writes[2] == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"


def test_a_head_with_no_body_yet_goes_out_at_the_end_of_its_turn() -> None:
    sent: dict[str, float] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2)  # a first chunk that is slow to come
        sent["body"] = time.monotonic()
        await send({"type": "http.response.body", "body": b"late"})

    async def run() -> tuple[list[bytes], float]:
        protocol, transport = _connect(app, GET)
        while not transport.writes:
            await asyncio.sleep(0.001)
        head_at = time.monotonic()
        while len(transport.writes) < 2:
            await asyncio.sleep(0.005)
        protocol.connection_lost(None)
        return transport.writes, head_at

    writes, head_at = asyncio.run(run())
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n")
    assert head_at < sent["body"] - 0.1  # not held until the body came
    assert writes[1] == b"4\r\nlate\r\n0\r\n\r\n"


def test_each_response_on_a_kept_alive_connection_gets_its_head_joined() -> None:
    writes = asyncio.run(_serve(_json_app, GET + GET + GET, responses=3))
    assert len(writes) == 3
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b'\r\n\r\n{"ok": true}') for w in writes)


def test_held_bytes_keep_their_order_and_go_out_before_a_close_and_not_after() -> None:
    async def run() -> tuple[Recorder, Recorder, Recorder]:
        loop = asyncio.get_running_loop()
        first, second, third = Recorder(), Recorder(), Recorder()
        held = HeadWithBody(first, loop)
        held.write(b"head")
        held.close()
        await asyncio.sleep(0)  # the end-of-turn flush finds nothing, and writes nothing to a closed socket
        joined = HeadWithBody(third, loop)  # every way of writing keeps the order
        joined.write(b"head ")
        joined.writelines([b"body", b" more"])
        joined.write(b" end")
        joined.write_eof()
        gone = HeadWithBody(second, loop)
        gone.write(b"head")
        second.close()  # the peer left: what was held is dropped, not written to a closed transport
        await asyncio.sleep(0)
        return first, second, third

    first, second, third = asyncio.run(run())
    assert first.writes == [b"head"] and first.closed
    assert second.writes == []
    assert third.writes == [b"head body more", b" end"] and third.eof


# ---- the access log ---------------------------------------------------------------------------
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_logger() -> Any:
    logger = logging.getLogger(f"test.access.{time.monotonic_ns()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = _Lines()
    logger.addHandler(handler)
    yield logger, handler


SCOPE = {"type": "http", "method": "POST", "raw_path": b"/v1/chat/completions", "query_string": b"a=1",
         "http_version": "1.1", "client": ("10.0.0.7", 41000)}


def test_access_lines_are_written_together_after_a_pause_with_their_own_times(access_logger: Any) -> None:
    logger, handler = access_logger

    async def run() -> tuple[int, float, float]:
        log = AccessLog(logger, flush_after=0.05)
        log.done(SCOPE, 200, time.monotonic() - 1.5, "chatcmpl-1")
        ended_first = time.time()
        await asyncio.sleep(0.02)
        log.done({**SCOPE, "query_string": b""}, None, time.monotonic(), "req-2")
        ended_second = time.time()
        early = len(handler.records)
        await asyncio.sleep(0.1)
        return early, ended_first, ended_second

    early, ended_first, ended_second = asyncio.run(run())
    assert early == 0  # nothing on the request's path
    first, second = (record.getMessage() for record in handler.records)
    assert first.startswith('10.0.0.7:41000 - "POST /v1/chat/completions?a=1 HTTP/1.1" 200 1.5')
    assert first.endswith("s chatcmpl-1")
    assert second.startswith('10.0.0.7:41000 - "POST /v1/chat/completions HTTP/1.1" - 0.0')
    assert second.endswith("s req-2")
    # Stamped when each request ended, not when the batch was written.
    assert abs(handler.records[0].created - ended_first) < 0.01
    assert abs(handler.records[1].created - ended_second) < 0.01
    assert handler.records[1].created - handler.records[0].created >= 0.015


def test_access_lines_flush_at_once_when_many_wait_or_on_demand(access_logger: Any) -> None:
    from gateway import accesslog

    logger, handler = access_logger

    async def run() -> tuple[int, int]:
        log = AccessLog(logger, flush_after=60)
        for i in range(accesslog.MAX_PENDING):
            log.done(SCOPE, 200, time.monotonic(), f"r{i}")
        full = len(handler.records)
        log.done(SCOPE, 200, time.monotonic(), "last")
        log.flush()  # as the app does at shutdown
        return full, len(handler.records)

    assert asyncio.run(run()) == (accesslog.MAX_PENDING, accesslog.MAX_PENDING + 1)


def test_no_access_line_is_kept_when_the_logger_is_quiet(access_logger: Any) -> None:
    logger, handler = access_logger
    logger.setLevel(logging.WARNING)

    async def run() -> None:
        log = AccessLog(logger, flush_after=0.01)
        log.done(SCOPE, 200, time.monotonic(), "r")
        await asyncio.sleep(0.05)
        log.flush()

    asyncio.run(run())
    assert handler.records == []
