"""Server-sent events: chunk framing, keep-alives, errors inside a started stream, disconnects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.disconnect import WatchDisconnect
from gateway.errors import as_openai_error, from_error_event
from gateway.relay import Event, EventStream
from gateway.responses import ChunkWriter

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def frame(data: Mapping[str, Any]) -> bytes:
    # orjson: one call per streamed token, a tenth of the stdlib's time (docs/benchmarks-notes.md).
    # It writes UTF-8 as is (as ensure_ascii=False did) and null for a float that is not finite.
    return b"data: " + orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


async def event_frames(
    stream: EventStream, first: Event, writer: ChunkWriter, keepalive: float
) -> AsyncIterator[bytes]:
    """SSE bytes for a stream whose first event (``started``) was already read.

    The 200 status is out by now, so errors become an ``error`` payload the SDK raises as
    ``APIError``, followed by ``[DONE]`` so clients that wait for it do not hang. The last piece
    always ends with ``DONE`` (``EventStreamResponse`` ends the body with it).
    """
    try:
        event: Event | None = first
        finished = False
        while not finished:
            if event is None:
                yield PING
            else:
                # Events that have already arrived go out in one write: under load that saves a
                # socket send per token, and the client parses several frames at once.
                frames: list[bytes] = []
                while event is not None:
                    if event.get("type") == "error":
                        frames.append(frame(from_error_event(event, writer.meta.max_tokens_param).body()))
                        finished = True
                        break
                    frames.extend(frame(chunk) for chunk in writer.chunks(event))
                    if event.get("type") == "done":
                        finished = True
                        break
                    event = await stream.ready()
                if finished:
                    frames.append(DONE)  # the same write as the last events
                if frames:
                    yield b"".join(frames)
            if not finished:
                event = await stream.next(timeout=keepalive)
    except Exception as exc:  # cancellation (client gone) is a BaseException and passes
        yield frame(as_openai_error(exc).body()) + DONE
    finally:
        await stream.aclose()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops its body as soon as the client leaves.

    Starlette's StreamingResponse only listens for ``http.disconnect`` under ASGI spec < 2.4;
    this one always does, and always runs ``on_close`` (which cancels the generation), even
    when the body never started.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self._content = content
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        """Starlette's, but the piece that ends with ``DONE`` also ends the body: the HTTP
        chunked terminator goes out in the same socket write instead of one more."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            last = isinstance(chunk, bytes) and chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with WatchDisconnect(receive):
                await self.stream_response(send)
        except OSError:
            pass  # the client went away mid-write
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._on_close()
