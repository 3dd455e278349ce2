"""The gateway as clients see it: a real uvicorn process, real Redis and arq, a scripted worker.

No model here: tests/scripted_worker.py plays the worker's side of the wire contract, including
the broken event sequences a real worker must never send.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.procs import Proc, free_port, start_gateway, wait_until
from tests.scripted_worker import CONTEXT_LENGTH, MAX_REQUEST_TOKENS, ScriptedWorker, scripted_worker
from tokenrelay import wire

MODEL = "scripted-model"
MAX_BODY = 65536
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def worker(redis_url: str) -> Iterator[ScriptedWorker]:
    with scripted_worker(redis_url, MODEL) as w:
        yield w


@pytest.fixture(scope="module")
def gateway(redis_url: str, log_dir: Path, worker: ScriptedWorker) -> Iterator[tuple[Proc, str]]:
    env = {"TOKENRELAY_QUEUE_TIMEOUT": "1", "TOKENRELAY_STREAM_KEEPALIVE": "0.4",
           "TOKENRELAY_MAX_REQUEST_BYTES": str(MAX_BODY)}
    proc, base = start_gateway(redis_url, log_dir, env)
    yield proc, base
    proc.stop()


@pytest.fixture()
def base(gateway: tuple[Proc, str]) -> str:
    return gateway[1]


@pytest.fixture()
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=20)


@pytest.fixture()
def rds(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def chat(base: str, content: str = "hi", **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(base + "/v1/chat/completions", json=payload, timeout=20)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def sse_payloads(text: str) -> list[Any]:
    """Every ``data:`` payload of an SSE body, JSON-decoded except the final [DONE]."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- validation -----------------------------------------------------------------------------

TEXT_PART = {"type": "text", "text": "a"}
CHAT_INVALID = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [TEXT_PART, {"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[1].type"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [*HI, {"role": "tool", "content": "42"}]}, "messages[1].tool_call_id"),
    ({"model": None}, "model"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
    ({"ignore_eos": "no"}, "ignore_eos"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "auto"}, "tool_choice"),  # no tools
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"required": 1}}}},
     "response_format"),
    # not supported yet: refused by name rather than ignored
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"best_of": 3}, "best_of"),
]
COMPLETION_INVALID = [
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"best_of": 2}, "best_of"),
]


@pytest.mark.parametrize(("change", "param"), CHAT_INVALID, ids=[p for _, p in CHAT_INVALID])
def test_chat_validation_names_the_param(base: str, change: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": HI, **change}
    r = httpx.post(base + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(("change", "param"), COMPLETION_INVALID, ids=[p for _, p in COMPLETION_INVALID])
def test_completion_validation_names_the_param(base: str, change: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "prompt": "hi", **change}
    r = httpx.post(base + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_body_must_be_a_json_object(base: str, raw: bytes) -> None:
    r = httpx.post(base + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = error_of(r)
    assert error["param"] is None and error["code"] is None
    assert ("not valid JSON" in error["message"]) == (raw not in (b"[1, 2]", b'"text"', b"null"))


def test_sdk_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=3)
    assert info.value.param == "temperature"


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert info.value.code == "model_not_found"
    assert "`no-such-model` does not exist" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_max_tokens_beyond_the_model_limit(base: str) -> None:
    r = chat(base, max_tokens=MAX_REQUEST_TOKENS + 1)
    assert r.status_code == 400
    assert error_of(r)["code"] == "context_length_exceeded" and error_of(r)["param"] == "max_tokens"
    assert chat(base, max_tokens=MAX_REQUEST_TOKENS).status_code == 200


def test_unknown_fields_are_accepted_and_logged_once(gateway: tuple[Proc, str]) -> None:
    proc, base = gateway
    extra = {"foo_unknown_field": {"a": 1}, "user": "u", "metadata": {"k": "v"}, "store": False,
             "service_tier": "auto", "parallel_tool_calls": True, "tools": [], "tool_choice": "none",
             "response_format": {"type": "text"}, "modalities": ["text"]}
    for _ in range(2):
        r = chat(base, **extra)
        assert r.status_code == 200, r.text
    assert proc.log().count("'foo_unknown_field'") == 1
    assert "'user'" not in proc.log()


def test_request_body_limit(base: str) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    r = httpx.post(base + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    chunks = iter([json.dumps(big).encode()[i:i + 4096] for i in range(0, MAX_BODY + 100, 4096)])
    r = httpx.post(base + "/v1/chat/completions", content=chunks)  # chunked: no Content-Length
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


# ---- plain endpoints ------------------------------------------------------------------------

def test_unknown_route_and_method(base: str) -> None:
    r = httpx.post(base + "/v1/nope", json={})
    assert r.status_code == 404 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.get(base + "/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["message"]


def test_health_ready_and_request_ids(base: str) -> None:
    r = httpx.get(base + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"} and len(r.headers["x-request-id"]) == 32
    assert httpx.get(base + "/ready").status_code == 200
    assert httpx.get(base + "/health", headers={"x-request-id": "mine-1"}).headers["x-request-id"] == "mine-1"
    r = chat(base)
    assert r.headers["x-request-id"] == r.json()["id"]
    r = chat(base, temperature=9)  # errors of a completion carry its id too
    assert r.headers["x-request-id"].startswith("chatcmpl-")


def test_models_lists_only_live_models(base: str, client: openai.OpenAI, rds: redis.Redis) -> None:
    stale = f"stale-{uuid.uuid4().hex[:6]}"
    info = wire.WorkerInfo("stale-worker", stale, 1, 10, 10, time.time())
    rds.set(wire.worker_key(info.worker_id), info.to_json(), px=300)
    time.sleep(0.6)  # key gone, registry cache (0.5 s) refreshed
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and stale not in ids
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.owned_by == "tokenrelay" and model.object == "model"


# ---- response shapes --------------------------------------------------------------------------

def test_chat_non_stream_shape(client: openai.OpenAI, base: str) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, n=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == "Hello world" and c.message.role == "assistant" for c in r.choices)
    assert all(c.finish_reason == "stop" and c.logprobs is None for c in r.choices)
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 4)
    assert r.usage.total_tokens == 11 and r._request_id == r.id
    raw = chat(base).json()
    assert set(raw) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert raw["choices"][0]["message"] == {"role": "assistant", "content": "Hello world", "refusal": None}


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content is not None and [t.token for t in content] == ["Hello", " world"]
    assert len(content[0].top_logprobs) == 2 and content[0].bytes == list(b"Hello")


def test_completion_non_stream_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, logprobs=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hello world" and c.finish_reason == "stop" for c in r.choices)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens == ["Hello", " world"] and lp.text_offset == [0, 5]
    assert lp.token_logprobs == [-0.5, -0.5] and lp.top_logprobs == [{"Hello": -1.0}, {" world": -1.0}]
    assert r.usage is not None and r.usage.completion_tokens == 8


def test_chat_stream_shape(client: openai.OpenAI, base: str) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert len({c.id for c in chunks}) == 1
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        assert len(c.choices) == 1 and c.usage is None
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == {0: "Hello world", 1: "Hello world"}
    roles = [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]]
    assert roles == [(0, "assistant"), (1, "assistant")]
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks[:-1]]
    assert [f for f in finishes if f[1]] == [(0, "stop"), (1, "stop")]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 11

    with httpx.stream("POST", base + "/v1/chat/completions",
                      json={"model": MODEL, "messages": HI, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        payloads = sse_payloads(r.read().decode())
    assert payloads[-1] == "[DONE]" and all("usage" not in p for p in payloads[:-1])
    assert payloads[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]
    assert payloads[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert r.headers["x-request-id"] == payloads[0]["id"]


def test_completion_stream_shape(client: openai.OpenAI, base: str) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="hi", stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "Hello world"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    body = {"model": MODEL, "prompt": "hi", "stream": True, "logprobs": 0}
    payloads = sse_payloads(httpx.post(base + "/v1/completions", json=body).text)
    first, second = (p["choices"][0] for p in payloads[:2])
    assert first["text"] == "Hello" and first["logprobs"]["tokens"] == ["Hello"]
    assert second["logprobs"]["text_offset"] == [5] and second["logprobs"]["top_logprobs"] == [{}]


def test_keepalive_pings(base: str) -> None:
    r = chat(base, "script:pause", stream=True)
    assert ": ping\n\n" in r.text and sse_payloads(r.text)[-1] == "[DONE]"


def test_request_reaches_the_worker_as_a_job(client: openai.OpenAI) -> None:
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "user", "content": [{"type": "text", "text": "script:echo-job"}]}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, max_completion_tokens=9, temperature=0,
        stop=["", "END"], logprobs=True, top_logprobs=3, seed=1,
        extra_body={"top_k": -1, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2,
                    "logit_bias": {"7": -100}},
    )
    job = wire.Job.from_dict(json.loads(r.choices[0].message.content or ""))
    assert job.request_id == r.id and job.kind == "chat" and job.model == MODEL
    assert [m["role"] for m in job.messages or []] == ["system", "assistant", "tool", "user"]
    assert job.messages and job.messages[1] == {"role": "assistant", "content": "",
                                                "tool_calls": [{"id": "c1", "type": "function"}]}
    assert job.messages[2]["tool_call_id"] == "c1" and job.messages[3]["content"] == "script:echo-job"
    s = job.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.min_p, s.stop, s.logprobs) == (9, 0.0, 0, 0.1, ["END"], 3)
    assert (s.repetition_penalty, s.ignore_eos, s.min_tokens, s.seed) == (1.1, True, 2, 1)
    assert s.logit_bias == {7: -100.0}
    assert time.time() < job.deadline <= time.time() + 1.5


# ---- failures ---------------------------------------------------------------------------------

def test_error_event_before_start_keeps_its_status(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "script:error-first"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages, stream=stream)
        assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_error_mid_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "script:error-mid"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert "the engine failed" in info.value.message and "partial" in seen
    with pytest.raises(openai.InternalServerError) as err:  # not started streaming: a real status
        client.chat.completions.create(model=MODEL, messages=messages)
    assert err.value.code == "engine_error"


@pytest.mark.parametrize("script", ["gap", "no-done"])
def test_lost_events_are_an_error_not_success(client: openai.OpenAI, script: str) -> None:
    messages = [{"role": "user", "content": f"script:{script}"}]
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert info.value.code == "events_lost"
    with pytest.raises(openai.APIError, match="lost"):
        list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))


def test_worker_lost(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "script:ghost"}]
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert info.value.status_code == 503 and info.value.code == "worker_lost"
    assert time.monotonic() - start < 6


def test_queue_timeout_sets_a_cancel_marker(base: str, rds: redis.Redis) -> None:
    idle = f"idle-{uuid.uuid4().hex[:6]}"  # registered, but no worker reads its queue
    info = wire.WorkerInfo(f"idle-worker-{idle}", idle, 1, CONTEXT_LENGTH, MAX_REQUEST_TOKENS, time.time())
    rds.set(wire.worker_key(info.worker_id), info.to_json(), ex=30)
    time.sleep(0.6)  # registry cache
    start = time.monotonic()
    r = httpx.post(base + "/v1/chat/completions", json={"model": idle, "messages": HI})
    assert r.status_code == 503 and error_of(r)["code"] == "queue_timeout"
    assert r.headers["x-should-retry"] == "false"  # the SDKs would otherwise retry it twice
    assert 0.9 < time.monotonic() - start < 3
    request_id = r.headers["x-request-id"]
    assert rds.get(wire.cancel_marker_key(request_id)) == b"1"
    # Withdrawn from the queue: it no longer counts toward --max-queue-length.
    assert rds.zcard(wire.queue_name(idle)) == 0 and not rds.exists(wire.arq_job_key(request_id))
    rds.delete(wire.worker_key(info.worker_id))


def test_cancel_withdraws_only_jobs_no_worker_started(redis_url: str, rds: redis.Redis) -> None:
    import asyncio

    import redis.asyncio

    from gateway.relay import publish_cancel

    queue = wire.queue_name(f"withdraw-{uuid.uuid4().hex[:6]}")
    waiting, taken = (f"chatcmpl-{uuid.uuid4().hex}" for _ in range(2))
    for job_id in (waiting, taken):
        rds.zadd(queue, {job_id: 1})
        rds.set(wire.arq_job_key(job_id), b"{}", ex=60)
    rds.set(wire.arq_in_progress_key(taken), b"1", ex=60)  # a worker took it

    async def cancel_both() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            for job_id in (waiting, taken):
                await publish_cancel(client, job_id, queue)
        finally:
            await client.aclose()

    asyncio.run(cancel_both())
    assert rds.zrange(queue, 0, -1) == [taken.encode()]  # the worker's arq removes it when done
    assert not rds.exists(wire.arq_job_key(waiting)) and rds.exists(wire.arq_job_key(taken))
    assert rds.get(wire.cancel_marker_key(waiting)) == rds.get(wire.cancel_marker_key(taken)) == b"1"
    rds.delete(queue, wire.arq_job_key(taken), wire.arq_in_progress_key(taken))


def test_disconnect_while_queued_cancels(base: str, rds: redis.Redis) -> None:
    idle = f"idle-{uuid.uuid4().hex[:6]}"
    info = wire.WorkerInfo(f"idle-worker-{idle}", idle, 1, CONTEXT_LENGTH, MAX_REQUEST_TOKENS, time.time())
    rds.set(wire.worker_key(info.worker_id), info.to_json(), ex=30)
    time.sleep(0.6)
    pubsub = _cancel_listener(rds)
    for stream in (True, False):  # a stream waits for its first event before sending headers
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", timeout=0.3,
                       json={"model": idle, "messages": HI, "stream": stream})
        assert _wait_cancel(pubsub, None, 0.5).startswith("chatcmpl-")
    # The withdrawal and the message are one transaction: both jobs left the queue already.
    assert rds.zcard(wire.queue_name(idle)) == 0
    rds.delete(wire.worker_key(info.worker_id))


def _cancel_listener(rds: redis.Redis) -> Any:
    pubsub = rds.pubsub()
    pubsub.subscribe(wire.CANCEL_CHANNEL)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    return pubsub


def _wait_cancel(pubsub: Any, request_id: str | None, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message and message["type"] == "message":
            got = message["data"].decode()
            if request_id is None or got == request_id:
                return str(got)
    raise AssertionError(f"no cancel for {request_id} within {timeout} s")


def test_stream_disconnect_cancels(base: str, rds: redis.Redis, worker: ScriptedWorker) -> None:
    pubsub = _cancel_listener(rds)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "script:slow"}], "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body) as r:
        request_id = r.headers["x-request-id"]
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)][2].startswith("data: ")  # role chunk, blank, a tick
    left = time.monotonic()
    assert _wait_cancel(pubsub, request_id, 1.0) == request_id
    assert time.monotonic() - left < 1.0
    time.sleep(0.3)
    assert request_id in worker.cancelled and rds.get(wire.cancel_marker_key(request_id)) == b"1"


def test_non_stream_disconnect_cancels(base: str, rds: redis.Redis, worker: ScriptedWorker) -> None:
    pubsub = _cancel_listener(rds)
    before = len(worker.jobs)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "script:slow"}]}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(base + "/v1/chat/completions", json=body, timeout=0.5)
    request_id = worker.jobs[before].request_id
    assert _wait_cancel(pubsub, request_id, 1.0) == request_id


def test_finished_requests_are_not_cancelled(base: str, rds: redis.Redis) -> None:
    pubsub = _cancel_listener(rds)
    r = chat(base)
    assert r.status_code == 200
    with pytest.raises(AssertionError):
        _wait_cancel(pubsub, r.json()["id"], 0.3)
    assert rds.get(wire.cancel_marker_key(r.json()["id"])) is None


def test_redis_unreachable(log_dir: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc, base = start_gateway(dead, log_dir)
    try:
        assert httpx.get(base + "/health").status_code == 200
        r = httpx.get(base + "/ready")
        assert r.status_code == 503 and error_of(r)["code"] == "redis_unavailable"
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=HI)
        assert info.value.status_code == 503 and info.value.code == "redis_unavailable"
    finally:
        proc.stop()


def test_the_access_log_is_on_by_default_and_can_be_turned_off(gateway: tuple[Proc, str], log_dir: Path) -> None:
    proc, base = gateway
    marker = f"/health?probe={uuid.uuid4().hex}"
    response = httpx.get(base + marker)
    assert response.status_code == 200
    wait_until(lambda: marker in proc.log(), 5, "the access log line")
    # Written as the request ended: its status, how long it took, and its id.
    line = next(line for line in proc.log().splitlines() if marker in line)
    assert re.search(rf'tokenrelay\.access: 127\.0\.0\.1:\d+ - "GET {re.escape(marker)} HTTP/1\.1" 200 '
                     rf'\d+\.\d{{3}}s {response.headers["x-request-id"]}$', line), line
    quiet, quiet_base = start_gateway(f"redis://127.0.0.1:{free_port()}/0", log_dir, {"TOKENRELAY_ACCESS_LOG": "off"})
    try:
        marker = f"/health?probe={uuid.uuid4().hex}"
        assert httpx.get(quiet_base + marker).status_code == 200
        assert httpx.get(quiet_base + "/v1/models").status_code == 503  # no Redis here: an error is not logged either
    finally:
        quiet.stop()
    assert marker not in quiet.log()
    assert "tokenrelay.access" not in quiet.log() and "uvicorn.access" not in quiet.log()
