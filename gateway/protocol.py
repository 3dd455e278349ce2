"""The HTTP/1.1 protocol the gateway runs: uvicorn's httptools protocol, with each response's
status line and headers sent in the same socket write as the first piece of its body.

uvicorn writes a response's head as soon as the app sends ``http.response.start``, then each
body piece as it comes: two sends for every response where one would do. A stream's head waits
for the worker's first event (gateway/routes.py), so its first chunk is ready the moment the
head is; under a wave of requests the gateway spent one socket send and one wake-up of the
client per request on the head alone, in the time the other requests' first tokens waited
(docs/benchmarks-notes.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadWithBody:
    """A connection's transport that holds the first write of each response (its head) until
    the response's next write, and sends the two as one.

    A head that nothing follows in the same turn of the event loop goes out alone at the end of
    that turn, so no response waits longer than that. Bytes always go out in the order they were
    written: holding only ever joins a write to the next one. Everything else is the transport's.
    """

    __slots__ = ("_expect_head", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._expect_head = True

    def next_response(self) -> None:
        """The response in flight is complete: the next write is the next response's head."""
        self.flush()
        self._expect_head = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif self._expect_head:
            self._expect_head = False
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(chunks))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` writing through ``HeadWithBody``; pass it to uvicorn as
    ``http=HttpProtocol``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control (set up above) keeps the real transport: it pauses and resumes reading.
        self._writes = HeadWithBody(transport, self.loop)
        self.transport = cast(asyncio.Transport, self._writes)

    def on_response_complete(self) -> None:
        self._writes.next_response()
        super().on_response_complete()
