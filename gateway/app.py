"""The ASGI app: routes, error handlers, the Redis pool's lifetime, request ids and body limits."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from arq.connections import ArqRedis
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.accesslog import AccessLog
from gateway.errors import EXCEPTION_HANDLERS, OpenAIError, as_openai_error, error_response
from gateway.registry import Registry
from gateway.relay import Relay
from gateway.routes import ROUTES, Gateway
from gateway.settings import GatewaySettings
from tokenrelay import wire
from tokenrelay.heap import freeze_startup_objects
from tokenrelay.redispool import ConcurrentConnectionPool

# Requests in flight each hold a pooled connection while they enqueue, check liveness or cancel;
# the pool must outgrow what can happen at once, or a request fails with "Too many connections".
MAX_REDIS_CONNECTIONS = 1000
_CLIENT_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")


def create_app(settings: GatewaySettings) -> Starlette:
    access_log = AccessLog() if settings.access_log else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Not arq's create_pool: it PINGs (and retries for seconds) at startup, but the gateway
        # must start without Redis so /health answers and /ready can report it.
        pool = ConcurrentConnectionPool.from_url(
            settings.redis_url,
            max_connections=MAX_REDIS_CONNECTIONS,
            socket_connect_timeout=3,
            socket_timeout=5,
        )
        redis = ArqRedis(pool, job_serializer=wire.serialize_job, job_deserializer=wire.deserialize_job)
        relay = Relay(redis, settings.queue_timeout, settings.max_queue_length)
        app.state.gateway = Gateway(settings, redis, Registry(redis), relay)
        warm_up = asyncio.create_task(relay.warm_up())
        freeze_startup_objects()
        try:
            yield
        finally:
            warm_up.cancel()
            await relay.drain(timeout=3)
            await redis.aclose()
            await pool.disconnect()
            if access_log is not None:
                access_log.flush()

    return Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestEnvelope, max_request_bytes=settings.max_request_bytes, access_log=access_log)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )


class RequestEnvelope:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide disconnects).

    * ``x-request-id`` on every response: the completion id when a completion handler set
      ``request.state.request_id``, else the client's own id when sane, else a fresh one;
    * bodies over ``max_request_bytes`` → 413, by Content-Length or by counting chunks;
    * unexpected exceptions → 500 envelope here, so that response gets its request id too;
    * each request's line in ``access_log`` (gateway/accesslog.py) as it ends.
    """

    def __init__(self, app: ASGIApp, max_request_bytes: int, access_log: AccessLog | None = None) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.monotonic()
        headers = Headers(scope=scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        client_id = headers.get("x-request-id", "")
        fallback = client_id if _CLIENT_REQUEST_ID.match(client_id) else uuid.uuid4().hex
        status: int | None = None  # once the response started

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                if "x-request-id" not in response_headers:
                    response_headers["x-request-id"] = str(state.get("request_id") or fallback)
            await send(message)

        limit = self.max_request_bytes
        too_large = OpenAIError(413, f"The request body is larger than the limit of {limit} bytes.",
                                code="request_too_large")
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        try:
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                await error_response(too_large)(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, receive_limited, send_with_id)
            except Exception as exc:
                if status is not None:
                    raise
                await error_response(as_openai_error(exc))(scope, receive, send_with_id)
        finally:
            if self.access_log is not None:
                self.access_log.done(scope, status, began, str(state.get("request_id") or fallback))
