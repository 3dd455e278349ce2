"""HTTP handlers: thin glue between the request models, the relay and the response shapes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.disconnect import WatchDisconnect
from gateway.errors import error_response, from_error_event, model_not_found, redis_unavailable
from gateway.openai_types import ChatCompletionRequest, CompletionRequest, parse_request
from gateway.registry import Registry, check_max_tokens
from gateway.relay import Event, EventStream, Relay
from gateway.responses import ChunkWriter, Collector, Kind, ResponseMeta
from gateway.settings import GatewaySettings
from gateway.sse import EventStreamResponse, event_frames
from tokenrelay import wire

T = TypeVar("T")

# Status for a request whose client left before the answer: nobody reads it, but access logs
# show what happened (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class Gateway:
    """What the handlers share; built by the app's lifespan."""

    settings: GatewaySettings
    redis: Any  # arq.connections.ArqRedis
    registry: Registry
    relay: Relay


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def chat_completions(request: Request) -> Response:
    request_id = _name_request(request, "chatcmpl")
    body = parse_request(await request.body(), ChatCompletionRequest)
    return await _complete(request, "chat", request_id, body)


async def completions(request: Request) -> Response:
    request_id = _name_request(request, "cmpl")
    body = parse_request(await request.body(), CompletionRequest)
    return await _complete(request, "completion", request_id, body)


def _name_request(request: Request, prefix: str) -> str:
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    request.state.request_id = request_id  # the x-request-id middleware reads it, errors included
    return request_id


async def _complete(
    request: Request, kind: Kind, request_id: str, body: ChatCompletionRequest | CompletionRequest
) -> Response:
    gateway = _gateway(request)
    info = await gateway.registry.get(body.model)
    check_max_tokens(info, *body.max_new_tokens)
    job = body.to_job(request_id, time.time() + gateway.settings.queue_timeout)
    meta = ResponseMeta(
        kind=kind,
        id=request_id,
        created=int(time.time()),
        model=body.model,
        choice_count=body.choice_count,
        logprobs=job.sampling.logprobs is not None,
        include_usage=body.include_usage,
        max_tokens_param=body.max_new_tokens[1],
    )
    if body.stream:
        return await _stream(request, gateway, job, meta)
    result = await _until_disconnect(request, _collect(gateway.relay, job, meta))
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result)


async def _collect(relay: Relay, job: wire.Job, meta: ResponseMeta) -> dict[str, Any]:
    stream = await relay.open(job)
    try:
        collector = Collector(meta)
        async for event in stream:
            if event["type"] == "error":
                raise from_error_event(event, meta.max_tokens_param)
            collector.add(event)
        return collector.body()
    finally:
        await stream.aclose()


async def _stream(request: Request, gateway: Gateway, job: wire.Job, meta: ResponseMeta) -> Response:
    async def first_event() -> tuple[EventStream, Event]:
        stream = await gateway.relay.open(job)
        try:
            event = await stream.next()
            assert event is not None
        except BaseException:
            await stream.aclose()
            raise
        return stream, event

    # The status line waits for the worker's first event, so a request it refuses (prompt too
    # long, say) gets a real 4xx instead of an error inside a 200 stream.
    opened = await _until_disconnect(request, first_event())
    if opened is None:
        return Response(status_code=CLIENT_CLOSED)
    stream, first = opened
    if first["type"] == "error":
        await stream.aclose()
        return error_response(from_error_event(first, meta.max_tokens_param))
    frames = event_frames(stream, first, ChunkWriter(meta), gateway.settings.stream_keepalive)
    return EventStreamResponse(frames, on_close=stream.aclose, headers={"x-request-id": meta.id})


async def _until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` until it finishes or the client disconnects (then cancel it: None).

    The body was read already, so the next ASGI message can only be ``http.disconnect``.
    """
    async with WatchDisconnect(request.receive):
        return await work
    return None  # the client left; ``work`` was cancelled (the relay cleans up as it unwinds)


async def list_models(request: Request) -> Response:
    models = await _gateway(request).registry.models()
    data = [_model_object(name, info.created) for name, info in sorted(models.items())]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    models = await _gateway(request).registry.models()
    if name not in models:
        raise model_not_found(name)
    return JSONResponse(_model_object(name, models[name].created))


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tokenrelay"}


async def health(request: Request) -> Response:
    """The process answers; says nothing about Redis or workers (that is /ready)."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    try:
        await _gateway(request).redis.ping()
    except (RedisError, OSError):
        return error_response(redis_unavailable())
    return JSONResponse({"status": "ready"})


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
]
