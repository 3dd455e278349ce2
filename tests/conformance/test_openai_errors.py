"""Errors as the official openai Python SDK sees them: each status becomes its exception class,
with OpenAI's ``message``, ``type``, ``param`` and ``code``; an error after the stream started
raises ``openai.APIError`` while iterating.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.conformance.support import HELLO, MODEL, ChatStream, chat, client_for, complete
from tests.procs import Proc, start_gateway, start_worker
from tokenrelay import wire

LONG = {"max_tokens": 3500, "extra_body": {"ignore_eos": True}}


def test_bad_request_error_fields(client: openai.OpenAI, conf_stack: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, temperature=3)
    e = err.value
    assert e.status_code == 400 and e.param == "temperature" and e.type == "invalid_request_error"
    assert "temperature" in e.message
    assert e.request_id  # x-request-id
    # The body is OpenAI's envelope, all four keys present.
    assert isinstance(e.body, dict) and set(e.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, suffix="x")
    assert (err.value.param, err.value.code) == ("suffix", "unsupported_parameter")
    # Not JSON at all: still the envelope.
    r = httpx.post(conf_stack + "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_validation_errors_have_a_code(client: openai.OpenAI) -> None:
    for kwargs in ({"temperature": 3}, {"n": 0}, {"messages": []}, {"seed": "x"}):
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, **kwargs)
        assert err.value.code, kwargs


def test_context_length_error_names_the_field_sent(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": "hello " * 2100}], max_completion_tokens=2000)
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "max_completion_tokens"


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    for call in (lambda: chat(client, messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=5),
                 lambda: complete(client, prompt="hello " * 5000, max_tokens=5),
                 lambda: ChatStream(client, max_tokens=100_000),
                 lambda: chat(client, max_completion_tokens=100_000)):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.code == "context_length_exceeded" and err.value.param


def test_not_found_error(client: openai.OpenAI) -> None:
    for call in (lambda: chat(client, model="no-such-model"),
                 lambda: ChatStream(client, model="no-such-model"),
                 lambda: complete(client, model="no-such-model"),
                 lambda: client.models.retrieve("no-such-model")):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.status_code == 404 and err.value.code == "model_not_found"
        assert err.value.type == "invalid_request_error"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):  # an unknown path: also the envelope
        client.get("/no/such/path", cast_to=object)


@pytest.fixture(scope="module")
def strict_gateway(redis_url: str, log_dir: Path) -> Iterator[str]:
    """A second gateway that lets one job wait per model and gives up on a queued job after 1 s."""
    gateway, base = start_gateway(redis_url, log_dir, {"TOKENRELAY_MAX_QUEUE_LENGTH": "1",
                                                       "TOKENRELAY_QUEUE_TIMEOUT": "1"})
    yield base
    gateway.stop()


def _first_chunk(stream: Any) -> Iterator[Any]:
    it = iter(stream)
    next(it)
    return it


def test_rate_limit_error_when_queue_full(
    redis_url: str, log_dir: Path, tiny_model: Path, conf_stack: str, strict_gateway: str
) -> None:
    busy = "tiny-conf-busy"
    worker = start_worker(redis_url, log_dir, str(tiny_model), busy, "--max-batch-size", "1")
    try:
        client = client_for(conf_stack)
        stream = client.chat.completions.create(model=busy, messages=HELLO, stream=True, **LONG)
        _first_chunk(stream)  # the worker is generating it: one job in the model's queue
        strict = client_for(strict_gateway)
        with pytest.raises(openai.RateLimitError) as err:
            strict.chat.completions.create(model=busy, messages=HELLO, max_tokens=2)
        e = err.value
        assert e.status_code == 429 and e.code == "queue_full" and e.type == "rate_limit_error"
        assert e.response.headers.get("retry-after")
        with pytest.raises(openai.RateLimitError):
            strict.completions.create(model=busy, prompt="x", max_tokens=2, stream=True)
        # The bound is per model: the main model's queue is empty, so the strict gateway serves it.
        assert strict.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
        stream.close()
    finally:
        worker.stop()


@contextlib.contextmanager
def ghost_model(redis_url: str, name: str, gateway: str) -> Iterator[redis.Redis]:
    """A model a worker key announces but no worker consumes: its jobs wait until they expire.
    Yields once ``gateway`` lists it (its registry caches the workers for a moment)."""
    store = redis.Redis.from_url(redis_url)
    info = wire.WorkerInfo(worker_id=f"{name}-1", model=name, capacity=1, context_length=4096,
                           max_request_tokens=4096, started_at=time.time())
    store.set(wire.worker_key(info.worker_id), info.to_json(), ex=30)
    try:
        listed = client_for(gateway).models.list
        deadline = time.monotonic() + 5
        while name not in [m.id for m in listed().data]:
            assert time.monotonic() < deadline, f"{gateway} never listed {name}"
            time.sleep(0.05)
        yield store
    finally:
        store.delete(wire.worker_key(info.worker_id), wire.queue_name(name))


def test_service_unavailable_when_no_worker_takes_the_job(redis_url: str, strict_gateway: str) -> None:
    ghost = "tiny-conf-ghost"
    with ghost_model(redis_url, ghost, strict_gateway):
        client = client_for(strict_gateway)
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model=ghost, messages=HELLO, max_tokens=2, stream=stream)
            assert err.value.status_code == 503 and err.value.code == "queue_timeout"
            assert err.value.type == "server_error"
            assert 0.9 < time.monotonic() - started < 5


def test_abandoned_jobs_do_not_fill_the_queue(redis_url: str, strict_gateway: str) -> None:
    ghost = "tiny-conf-ghost-2"
    with ghost_model(redis_url, ghost, strict_gateway):
        client = client_for(strict_gateway)
        for _ in range(2):
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model=ghost, messages=HELLO, max_tokens=2)
            # The first gets 503 queue_timeout; the second, with nothing really waiting, should too.
            assert (err.value.status_code, err.value.code) == (503, "queue_timeout")


def test_queue_timeout_is_not_retried_by_the_sdk(redis_url: str, strict_gateway: str) -> None:
    """The SDKs retry every 5xx twice by default; ``x-should-retry: false`` stops that, so a
    queue timeout costs one queue wait, not three."""
    ghost = "tiny-conf-ghost-3"
    sent: list[httpx.Request] = []
    with ghost_model(redis_url, ghost, strict_gateway), httpx.Client(event_hooks={"request": [sent.append]}) as http:
        client = openai.OpenAI(base_url=strict_gateway + "/v1", api_key="x", max_retries=2, timeout=30,
                               http_client=http)
        for stream in (False, True):
            sent.clear()
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model=ghost, messages=HELLO, max_tokens=2, stream=stream)
            assert (err.value.status_code, err.value.code) == (503, "queue_timeout")
            assert err.value.response.headers["x-should-retry"] == "false"
            assert len(sent) == 1, [r.headers.get("x-stainless-retry-count") for r in sent]
            assert time.monotonic() - started < 2.5  # one 1 s queue timeout, no retry with backoff


def test_mid_stream_error_raises_api_error(redis_url: str, log_dir: Path, tiny_model: Path, conf_stack: str) -> None:
    """A worker killed mid-stream: the SDK raises ``APIError`` while iterating; on the wire that is
    ``data: {"error": {...}}`` then ``data: [DONE]`` inside the 200 stream."""
    doomed: Proc = start_worker(redis_url, log_dir, str(tiny_model), "tiny-conf-doomed")
    try:
        client = client_for(conf_stack)
        stream = client.chat.completions.create(model="tiny-conf-doomed", messages=HELLO, stream=True, **LONG)
        rest = _first_chunk(stream)
        body = {"model": "tiny-conf-doomed", "messages": HELLO, "max_tokens": 3500, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", conf_stack + "/v1/chat/completions", json=body, timeout=30) as raw:
            assert raw.status_code == 200
            lines = raw.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            doomed.kill()
            killed = time.monotonic()
            with pytest.raises(openai.APIError) as err:
                for _ in rest:
                    pass
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert time.monotonic() - killed < wire.WORKER_TTL_S + 4
        assert "worker" in err.value.message.lower()
        assert not isinstance(err.value, openai.APIStatusError)  # raised from the stream's data, not a status
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["code"] == "worker_lost"
    finally:
        doomed.stop()
