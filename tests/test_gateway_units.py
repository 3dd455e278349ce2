"""Gateway pieces without a server: settings, request → job, event → response shapes, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.disconnect import WatchDisconnect
from gateway.errors import OpenAIError, from_error_event
from gateway.openai_types import ChatCompletionRequest, CompletionRequest, parse_request
from gateway.responses import ChunkWriter, Collector, ResponseMeta, TextOffsets
from gateway.settings import OPTIONS, GatewaySettings
from gateway.sse import DONE, EventStreamResponse, frame
from gateway.subscriber import Inbox
from tokenrelay import config, wire


def test_settings_from_flags_env_and_defaults() -> None:
    values = config.resolve(OPTIONS, {"port": "9000"}, {"TOKENRELAY_QUEUE_TIMEOUT": "2.5", "REDIS_URL": "redis://r:1/2"})
    settings = GatewaySettings.from_values(values)
    assert settings == GatewaySettings(redis_url="redis://r:1/2", port=9000, queue_timeout=2.5)
    assert GatewaySettings.from_env({}) == GatewaySettings()
    assert GatewaySettings.from_env({}).access_log is True
    assert GatewaySettings.from_env({"TOKENRELAY_ACCESS_LOG": "0"}).access_log is False


def test_settings_come_back_whole_from_the_variables_they_give() -> None:
    """``--processes`` hands its settings to each process it starts as variables."""
    settings = GatewaySettings(redis_url="redis://r:1/2", host="::1", port=9001, processes=3, reuse_port=True,
                               queue_timeout=0.25, stream_keepalive=7.5, max_queue_length=0,
                               max_request_bytes=4096, access_log=False)
    assert GatewaySettings.from_env(settings.to_env()) == settings
    assert GatewaySettings.from_env(GatewaySettings().to_env()) == GatewaySettings()


@pytest.mark.parametrize(("env", "flag"), [
    ({"TOKENRELAY_PORT": "0"}, "--port"),
    ({"TOKENRELAY_PROCESSES": "0"}, "--processes"),
    ({"TOKENRELAY_REUSE_PORT": "maybe"}, "--reuse-port"),
    ({"TOKENRELAY_QUEUE_TIMEOUT": "0"}, "--queue-timeout"),
    ({"TOKENRELAY_STREAM_KEEPALIVE": "soon"}, "--stream-keepalive"),
    ({"TOKENRELAY_MAX_REQUEST_BYTES": "-1"}, "--max-request-bytes"),
    ({"REDIS_URL": "http://x"}, "--redis-url"),
    ({"TOKENRELAY_ACCESS_LOG": "quiet"}, "--access-log"),
])
def test_bad_settings_name_the_flag(env: dict[str, str], flag: str) -> None:
    with pytest.raises(config.ConfigError, match=flag):
        GatewaySettings.from_env(env)


def _chat(**body: Any) -> ChatCompletionRequest:
    body.setdefault("model", "m")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_request(json.dumps(body).encode(), ChatCompletionRequest)


def _completion(**body: Any) -> CompletionRequest:
    body.setdefault("model", "m")
    return parse_request(json.dumps(body).encode(), CompletionRequest)


def test_chat_defaults_and_greedy() -> None:
    job = _chat(temperature=0).to_job("chatcmpl-1", 123.0)
    assert (job.request_id, job.kind, job.deadline, job.n) == ("chatcmpl-1", "chat", 123.0, 1)
    assert job.prompts is None and job.tools is None and job.response_format is None
    assert job.sampling == wire.SamplingParams(temperature=0.0)
    assert wire.Job.from_dict(json.loads(wire.serialize_job(job.to_dict()))) == job


def test_max_tokens_precedence() -> None:
    assert _chat(max_tokens=5).to_job("x", 0).sampling.max_tokens == 5
    assert _chat(max_tokens=5, max_completion_tokens=9).to_job("x", 0).sampling.max_tokens == 9
    both = _completion(prompt="p", max_tokens=5, max_completion_tokens=9)
    assert both.to_job("x", 0).sampling.max_tokens == 5  # completions' own field wins there
    assert _completion(prompt="p", max_completion_tokens=9).to_job("x", 0).sampling.max_tokens == 9


def test_logprobs_mapping() -> None:
    assert _chat().to_job("x", 0).sampling.logprobs is None
    assert _chat(logprobs=True).to_job("x", 0).sampling.logprobs == 0
    assert _chat(logprobs=True, top_logprobs=4).to_job("x", 0).sampling.logprobs == 4
    assert _completion(prompt="p", logprobs=0).to_job("x", 0).sampling.logprobs == 0


@pytest.mark.parametrize(("prompt", "prompts"), [
    ("a", ["a"]), (["a", ""], ["a", ""]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_forms(prompt: Any, prompts: list[Any]) -> None:
    request = _completion(prompt=prompt, n=3, echo=True)
    job = request.to_job("cmpl-1", 0)
    assert job.prompts == prompts and job.n == 3 and job.echo and request.choice_count == 3 * len(prompts)


def test_message_normalisation() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    job = _chat(messages=[{"role": "developer", "content": "sys", "name": "n"},
                          {"role": "user", "content": parts, "extra_thing": 1}]).to_job("x", 0)
    assert job.messages == [{"role": "system", "content": "sys", "name": "n"},
                            {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"temperature": 3}, "temperature", "decimal_above_max_value"),
    ({"temperature": -1}, "temperature", "decimal_below_min_value"),
    ({"top_p": 0}, "top_p", "decimal_below_min_value"),
    ({"n": 0}, "n", "integer_below_min_value"),
    ({"n": 129}, "n", "integer_above_max_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "integer_above_max_value"),
    ({"messages": []}, "messages", "empty_array"),
    ({"messages": None}, "messages", "invalid_type"),
    ({"seed": "x"}, "seed", "invalid_type"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"model": None}, "model", "invalid_type"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "invalid_value"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "missing_required_parameter"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
])
def test_validation_errors_have_openai_codes(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(OpenAIError) as err:
        _chat(**body)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)


def test_missing_fields_are_named() -> None:
    with pytest.raises(OpenAIError) as err:
        parse_request(b'{"model": "m"}', ChatCompletionRequest)
    assert (err.value.param, err.value.code) == ("messages", "missing_required_parameter")
    with pytest.raises(OpenAIError) as err:
        _completion(prompt=[])
    assert (err.value.param, err.value.code) == ("prompt", "empty_array")


def test_context_length_error_names_the_field_sent() -> None:
    event = wire.error_event(0, status=400, message="m", type_="invalid_request_error", param="max_tokens",
                             code="context_length_exceeded")
    assert from_error_event(event).param == "max_tokens"
    assert from_error_event(event, "max_completion_tokens").param == "max_completion_tokens"
    other = wire.error_event(0, status=400, message="m", param="max_tokens", code="something_else")
    assert from_error_event(other, "max_completion_tokens").param == "max_tokens"
    messages = {**event, "error": {**event["error"], "param": "messages"}}
    assert from_error_event(messages, "max_completion_tokens").param == "messages"


def test_error_event_is_trusted_only_in_shape() -> None:
    good = from_error_event(wire.error_event(0, status=400, message="m", type_="t", param="p", code="c"))
    assert good.status == 400
    assert good.body() == {"error": {"message": "m", "type": "t", "param": "p", "code": "c"}}
    odd = from_error_event({"seq": 0, "type": "error", "status": 200, "error": "boom"})
    assert odd.status == 500 and odd.type == "server_error" and odd.message


META = ResponseMeta(kind="chat", id="chatcmpl-1", created=1, model="m", choice_count=2, logprobs=False)
EVENTS = [
    wire.started_event(0, worker_id="w", prompt_tokens=3),
    wire.delta_event(1, [wire.choice_delta(0, "Hi", tokens=1), wire.choice_delta(1, "", tokens=1)]),
    wire.delta_event(2, [wire.choice_delta(1, "Yo", tokens=1, finish_reason="length"),
                         wire.choice_delta(0, "", finish_reason="stop")]),
    wire.done_event(3, prompt_tokens=3, completion_tokens=3, cached_tokens=2),
]


def test_collector_chat() -> None:
    collector = Collector(META)
    for event in EVENTS:
        collector.add(event)
    body = collector.body()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Hi", "stop"), (1, "Yo", "length")]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    # A worker of an earlier version sends no cached_tokens: none were cached.
    older = Collector(META)
    for event in EVENTS:
        older.add({k: v for k, v in event.items() if k != "cached_tokens"})
    assert older.body()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_chunk_writer_chat_one_choice_per_chunk() -> None:
    writer = ChunkWriter(ResponseMeta(**{**META.__dict__, "include_usage": True}))
    chunks = [c for e in EVENTS for c in writer.chunks(e)]
    summary = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
               if c["choices"] else c["usage"] for c in chunks]
    assert summary == [
        (0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None),
        (0, {"content": "Hi"}, None),  # choice 1's empty text is skipped
        (1, {"content": "Yo"}, None), (1, {}, "length"), (0, {}, "stop"),
        {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 2}},
    ]
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])


def test_chunk_writer_completion() -> None:
    meta = ResponseMeta(kind="completion", id="cmpl-1", created=1, model="m", choice_count=2, logprobs=False)
    chunks = [c for e in EVENTS for c in ChunkWriter(meta).chunks(e)]
    assert chunks[0]["object"] == "text_completion" and "usage" not in chunks[0]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hi", "Yo", "", ""]


def test_openai_error_body() -> None:
    error = OpenAIError(429, "slow down", "rate_limit_error", code="rate_limited")
    assert error.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                      "code": "rate_limited"}}


@pytest.fixture()
def thawed() -> Iterator[None]:
    """Tests that start the app's lifespan freeze this process's objects: thaw them after."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("thawed")
def test_unexpected_errors_get_the_envelope_and_an_id() -> None:
    from starlette.requests import Request
    from starlette.testclient import TestClient

    from gateway.app import create_app

    async def boom(request: Request) -> None:
        raise RuntimeError("bug")

    app = create_app(GatewaySettings(redis_url="redis://127.0.0.1:1/0"))
    app.add_route("/boom", boom)
    with TestClient(app) as client:
        r = client.get("/boom")
        assert r.status_code == 500 and r.headers["x-request-id"]
        assert r.json()["error"]["type"] == "server_error" and "bug" not in r.text
        assert client.get("/health").status_code == 200


@pytest.mark.usefixtures("thawed")
def test_startup_hides_what_lives_forever_from_full_collections() -> None:
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from tokenrelay.heap import freeze_startup_objects

    class Node:
        other: Any = None

    kept = [[i] for i in range(1000)]  # alive before, so frozen
    cycle = Node()
    cycle.other = cycle  # garbage before, so collected, not frozen for good
    gone = weakref.ref(cycle)
    del cycle
    freeze_startup_objects()
    assert gc.get_freeze_count() >= len(kept)
    assert gone() is None
    gc.unfreeze()
    with TestClient(create_app(GatewaySettings(redis_url="redis://127.0.0.1:1/0"))) as client:
        assert gc.get_freeze_count() >= len(kept)  # the lifespan froze them again
        assert client.get("/health").status_code == 200


def test_gateway_never_imports_the_model_stack() -> None:
    import subprocess
    import sys

    code = ("import sys, gateway.server, gateway.app; from tokenrelay import cli; cli._parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _lp(token: str, raw: bytes | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": -1.0, "bytes": list(token.encode() if raw is None else raw), "top_logprobs": []}


def test_text_offsets_follow_the_text_sent() -> None:
    offsets = TextOffsets()
    # A special token (not in the text), then a plain one.
    assert offsets.add([_lp("<|im_start|>")], "") == [0]
    assert offsets.add([_lp(" lazy")], " lazy") == [0]
    # 'é' split over two byte tokens: the first one's text comes with the second.
    assert offsets.add([_lp("\ufffd", b"\xc3")], "") == [5]
    assert offsets.add([_lp("\ufffd", b"\xa9")], "é") == [5]
    assert offsets.add([_lp(" fox")], " fox") == [6]
    assert offsets.length == len(" lazyé fox")
    # An echoed prompt: many tokens in one delta, a split character and a special token among them.
    echo = TextOffsets()
    entries = [_lp("ab"), _lp("\ufffd", b"\xc3"), _lp("\ufffd", b"\xa9"), _lp("<s>"), _lp(" c"), _lp("d")]
    assert echo.add(entries, "abé cd") == [0, 2, 2, 3, 3, 5]
    # Text a stop string cut off: the offset stays inside the text.
    cut = TextOffsets()
    assert cut.add([_lp("ab"), _lp("STOP")], "ab") == [0, 2]


def test_completion_text_offset_stream_equals_non_stream() -> None:
    meta = ResponseMeta(kind="completion", id="cmpl-1", created=1, model="m", choice_count=1, logprobs=True)
    deltas = [("", [_lp("<|im_start|>")]), (" lazy", [_lp(" lazy")]), ("", [_lp("\ufffd", b"\xc3")]),
              ("é", [_lp("\ufffd", b"\xa9")]), ("", [_lp("<|im_start|>")]), (" lazy", [_lp(" lazy")])]
    events = [wire.started_event(0, worker_id="w", prompt_tokens=1)]
    events += [wire.delta_event(i + 1, [wire.choice_delta(0, text, tokens=1, logprobs=lps)])
               for i, (text, lps) in enumerate(deltas)]
    events.append(wire.done_event(len(events), prompt_tokens=1, completion_tokens=len(deltas)))
    collector, writer = Collector(meta), ChunkWriter(meta)
    streamed: list[int] = []
    for event in events:
        collector.add(event)
        for chunk in writer.chunks(event):
            if chunk["choices"] and chunk["choices"][0]["logprobs"]:
                streamed += chunk["choices"][0]["logprobs"]["text_offset"]
    choice = collector.body()["choices"][0]
    assert choice["text"] == " lazyé lazy"
    assert choice["logprobs"]["text_offset"] == streamed == [0, 0, 5, 5, 6, 6]


@pytest.mark.parametrize("ends_with_done", [True, False])
def test_the_sse_body_ends_in_the_write_that_carries_done(ends_with_done: bool) -> None:
    """``[DONE]`` and the HTTP chunked terminator go out in one body message (one socket write);
    a body that ends another way still ends with an empty one."""
    closed: list[str] = []

    async def content() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n" + (DONE if ends_with_done else b"")
        finally:
            closed.append("content")

    async def on_close() -> None:
        closed.append("on_close")

    async def main() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        await EventStreamResponse(content(), on_close=on_close)(scope, receive, send)
        return sent

    sent = asyncio.run(main())
    bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
    if ends_with_done:
        assert bodies == [(b"data: 1\n\n", True), (b"data: 2\n\n" + DONE, False)]
    else:
        assert bodies == [(b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"", False)]
    assert closed == ["content", "on_close"]


def test_a_job_dict_is_what_asdict_gives() -> None:
    job = wire.Job.from_dict({"request_id": "r", "model": "m", "kind": "chat", "deadline": 1.0, "n": 2,
                              "messages": [{"role": "user", "content": "hi"}],
                              "sampling": {"max_tokens": 5, "stop": ["x"], "logit_bias": {"3": 1.5}}})
    assert job.to_dict() == dataclasses.asdict(job)
    assert wire.Job.from_dict(json.loads(wire.serialize_job(job.to_dict()))) == job


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_events_and_frames_are_strict_json() -> None:
    # Text goes as UTF-8; a float that is not finite becomes null. The stdlib's encoder wrote
    # NaN and -Infinity, which strict parsers (JavaScript's JSON.parse) refuse.
    events = [("r1", {"seq": 0, "type": "delta", "text": "é 東京 🙂", "logprob": float("-inf")}),
              ("r2", {"seq": 3, "type": "done", "score": float("nan")})]
    message = wire.encode_events(events)
    assert "é 東京 🙂".encode() in message
    json.loads(message, parse_constant=_refuse_constant)
    assert wire.parse_events(message) == [
        ("r1", {"seq": 0, "type": "delta", "text": "é 東京 🙂", "logprob": None}),
        ("r2", {"seq": 3, "type": "done", "score": None}),
    ]
    body = frame({"text": "東京", "logprob": float("inf")})
    assert body.startswith(b"data: ") and body.endswith(b"\n\n")
    assert json.loads(body[len(b"data: "):-2], parse_constant=_refuse_constant) == {"text": "東京", "logprob": None}


@pytest.mark.parametrize("message", [b"", b"[", b'{"seq": 0}', b'[["r", {"type": "delta"}]]', b'[["r"]]', b"[1]"])
def test_an_unreadable_reply_message_is_a_value_error(message: bytes) -> None:
    with pytest.raises(ValueError, match="not a tokenrelay"):
        wire.parse_events(message)


def test_inbox_waits_wakes_times_out_and_survives_a_cancelled_wait() -> None:
    async def main() -> None:
        inbox = Inbox(None, "r")  # type: ignore[arg-type]  # the subscriber is needed only by close()
        assert await inbox.get(0.0) is None
        started = asyncio.get_running_loop().time()
        assert await inbox.get(0.05) is None
        assert asyncio.get_running_loop().time() - started >= 0.04
        waiting = asyncio.create_task(inbox.get(5.0))
        await asyncio.sleep(0)
        inbox.put({"seq": 0})
        inbox.put({"seq": 1})
        assert await asyncio.wait_for(waiting, 1.0) == {"seq": 0}
        assert await inbox.get(0.0) == {"seq": 1}
        cancelled = asyncio.create_task(inbox.get(5.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        inbox.put({"seq": 2})  # nothing is lost to the cancelled wait
        inbox.put(ConnectionError("gone"))
        assert await inbox.get(1.0) == {"seq": 2}
        with pytest.raises(ConnectionError, match="gone"):
            await inbox.get(1.0)

    asyncio.run(main())


def test_watch_disconnect_cancels_only_its_own_body() -> None:
    async def main() -> None:
        left = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await left.wait()
            return {"type": "http.disconnect"}

        # The client leaves mid-body: the body stops at its await, the block absorbs it.
        reached = []
        async with WatchDisconnect(receive) as watch:
            left.set()
            await asyncio.sleep(5)
            reached.append("after sleep")
        assert watch.gone and reached == []
        await asyncio.sleep(0.01)  # nothing left pending on this task

        # A body that ends first: the watcher stops, and a disconnect afterwards cancels nothing.
        left.clear()
        async with WatchDisconnect(receive) as watch:
            await asyncio.sleep(0)
        left.set()
        await asyncio.sleep(0.01)
        assert not watch.gone

        # Cancelled from outside while the client leaves too (``left`` is still set): the
        # server's cancellation goes on.
        async def served() -> None:
            async with WatchDisconnect(receive):
                await asyncio.sleep(5)

        task = asyncio.ensure_future(served())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
