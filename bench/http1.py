"""A small HTTP/1.1 client for the load generator: one keep-alive connection per simulated user,
a streamed response handed over line by line from the socket's callback.

httpx costs more CPU per streamed chunk than the gateway it measures (~135 against ~85 CPU-ms per
1000 tokens on the overhead point, docs/benchmarks-notes.md), and the two share the CPUs. Here a
chunk costs one ``data_received`` call and no task switch: lines go to a callback as they arrive,
so the time a line is seen is the time its bytes were read. It speaks what the servers under test
answer (status line, headers, then a body sized by ``Content-Length``, chunked, or ended by the
close) and nothing else: no TLS, no redirects, no compression, no proxies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit


class HTTPError(Exception):
    """The connection broke, or the server answered with something this client does not parse."""


LineHandler = Callable[[bytes], None]


class _Response(asyncio.Protocol):
    """Parses one response at a time on one connection; ``done`` ends with the status code."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._begin(None)

    def _begin(self, on_line: LineHandler | None) -> None:
        self.on_line = on_line
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.keep_alive = True
        self.body = bytearray()  # the body of a non-200 answer, for its error message
        self._state = "head"
        self._remaining = -1  # bytes left in this chunk, or in a Content-Length body
        self._chunked = False
        self._line = bytearray()

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done.done():
            return
        if self._state == "body" and not self._chunked and self._remaining < 0:
            self._finish()  # a body that ends with the connection
        else:
            self.done.set_exception(HTTPError(f"connection closed ({exc or 'by the server'})"))

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # bytes after an answer we gave up on; the connection is dropped after it
        self._buf += data
        try:
            self._parse()
        except Exception as exc:  # a bad answer, or the line handler's own error: this request ends
            self.done.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    # ---- parsing ------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        while buf and not self.done.done():
            if self._state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(buf[:end]))
                del buf[: end + 4]
            elif self._state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                try:
                    self._remaining = int(bytes(buf[:end]).split(b";")[0], 16)
                except ValueError as exc:
                    raise HTTPError(f"bad chunk size {bytes(buf[:end])[:40]!r}") from exc
                del buf[: end + 2]
                self._state = "trailer" if self._remaining == 0 else "body"
            elif self._state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish()
            elif self._state == "body":
                take = len(buf) if self._remaining < 0 else min(len(buf), self._remaining)
                self._feed(bytes(buf[:take]))
                del buf[:take]
                if self._remaining >= 0:
                    self._remaining -= take
                    if self._remaining == 0:
                        if self._chunked:
                            self._state = "crlf"
                        else:
                            self._finish()
            elif self._state == "crlf":
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise HTTPError("chunk not followed by CRLF")
                del buf[:2]
                self._state = "size"

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPError(f"not an HTTP/1 status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        length = -1
        self.keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                self._chunked = value.endswith(b"chunked")
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                self.keep_alive = value != b"close"
        if self._chunked:
            self._state = "size"
        elif length >= 0:
            self._state, self._remaining = "body", length
            if length == 0:
                self._finish()
        else:
            self._state, self.keep_alive = "body", False  # read until the server closes

    def _feed(self, data: bytes) -> None:
        if self.status != 200 or self.on_line is None:
            self.body += data
            return
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._line += data[start:]
                return
            if self._line:
                self._line += data[start:end]
                line, self._line = bytes(self._line), bytearray()
            else:
                line = data[start:end]
            self.on_line(line.rstrip(b"\r"))
            start = end + 1

    def _finish(self) -> None:
        if self._line and self.on_line is not None and self.status == 200:
            self.on_line(bytes(self._line).rstrip(b"\r"))
            self._line = bytearray()
        self._state = "idle"
        self.done.set_result(self.status)


class Connection:
    """One keep-alive connection to ``base_url``'s host, one request at a time; it reconnects
    when the server closed it. Keyword-only ``headers`` go with every request."""

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"only http:// URLs: {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._headers = f"Host: {url.netloc}\r\n{extra}"
        self._proto: _Response | None = None

    async def post_json(self, path: str, body: dict[str, Any], on_line: LineHandler) -> tuple[int, bytes]:
        """POST ``body``; each line of a 200 answer's body goes to ``on_line`` (without its line
        end) as its bytes arrive. Returns the status and, when it is not 200, the body."""
        proto = self._proto
        if proto is None or proto.closed or not proto.keep_alive:
            self.close()
            _, proto = await asyncio.get_running_loop().create_connection(_Response, self.host, self.port)
            self._proto = proto
        proto._begin(on_line)
        payload = json.dumps(body).encode()
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\n{self._headers}Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        assert proto.transport is not None
        proto.transport.write(head + payload)
        try:
            status = await proto.done
        except BaseException:
            self.close()  # given up (cancelled, timed out) or broken mid-answer: not reusable
            raise
        if not proto.keep_alive:
            self.close()
        return status, bytes(proto.body)

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
