"""Gateway pieces without a server: settings, request → job, event → response shapes, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import OpenAIError, from_error_event
from gateway.openai_types import ChatCompletionRequest, CompletionRequest, parse_request
from gateway.responses import ChunkWriter, Collector, ResponseMeta
from gateway.settings import OPTIONS, GatewaySettings
from tokenrelay import config, wire


def test_settings_from_flags_env_and_defaults() -> None:
    values = config.resolve(OPTIONS, {"port": "9000"}, {"TOKENRELAY_QUEUE_TIMEOUT": "2.5", "REDIS_URL": "redis://r:1/2"})
    settings = GatewaySettings.from_values(values)
    assert settings == GatewaySettings(redis_url="redis://r:1/2", port=9000, queue_timeout=2.5)
    assert GatewaySettings.from_env({}) == GatewaySettings()


@pytest.mark.parametrize(("env", "flag"), [
    ({"TOKENRELAY_PORT": "0"}, "--port"),
    ({"TOKENRELAY_QUEUE_TIMEOUT": "0"}, "--queue-timeout"),
    ({"TOKENRELAY_STREAM_KEEPALIVE": "soon"}, "--stream-keepalive"),
    ({"TOKENRELAY_MAX_REQUEST_BYTES": "-1"}, "--max-request-bytes"),
    ({"REDIS_URL": "http://x"}, "--redis-url"),
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
    wire.done_event(3, prompt_tokens=3, completion_tokens=3),
]


def test_collector_chat() -> None:
    collector = Collector(META)
    for event in EVENTS:
        collector.add(event)
    body = collector.body()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Hi", "stop"), (1, "Yo", "length")]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chunk_writer_chat_one_choice_per_chunk() -> None:
    writer = ChunkWriter(ResponseMeta(**{**META.__dict__, "include_usage": True}))
    chunks = [c for e in EVENTS for c in writer.chunks(e)]
    summary = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
               if c["choices"] else c["usage"] for c in chunks]
    assert summary == [
        (0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None),
        (0, {"content": "Hi"}, None),  # choice 1's empty text is skipped
        (1, {"content": "Yo"}, None), (1, {}, "length"), (0, {}, "stop"),
        {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
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


def test_gateway_never_imports_the_model_stack() -> None:
    import subprocess
    import sys

    code = ("import sys, gateway.server, gateway.app; from tokenrelay import cli; cli._parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
