"""The whole path on real parts: openai SDK -> uvicorn gateway -> arq/Redis -> worker -> pub/sub -> SSE.

The model is a tiny random Llama (its text is gibberish, but greedy decoding is deterministic,
so stream/non-stream equality, stops and lengths are exact).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.procs import Proc, serving, start_worker
from tokenrelay import wire

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture(scope="module")
def stack(redis_url: str, log_dir: Path, tiny_model: Path) -> Iterator[str]:
    with serving(redis_url, log_dir, str(tiny_model), MODEL, "--max-batch-size", "16") as base:
        yield base


def chat(client: openai.OpenAI, **kwargs: object) -> tuple[str, str | None, object]:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", HELLO)
    r = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    return r.choices[0].message.content, r.choices[0].finish_reason, r


def stream_chat(client: openai.OpenAI, **kwargs: object) -> tuple[dict[int, str], dict[int, str], list[object]]:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", HELLO)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, chunks


def test_chat_non_stream_shape_and_usage(client: openai.OpenAI, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    _, finish, r = chat(client, max_tokens=12, temperature=0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].index == 0
    assert finish in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r._request_id  # the x-request-id header


def test_stream_equals_non_stream_under_greedy(client: openai.OpenAI) -> None:
    text, finish, _ = chat(client, max_tokens=40, temperature=0)
    texts, finishes, chunks = stream_chat(client, max_tokens=40, temperature=0,
                                          stream_options={"include_usage": True})
    assert texts[0] == text and finishes[0] == finish
    first = chunks[0]
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_usage_counts_the_prompt_tokens_taken_from_the_prefix_cache(client: openai.OpenAI) -> None:
    """A prompt that starts like an earlier one reuses its KV (whole 16-token blocks), and usage
    says so as OpenAI does: ``prompt_tokens_details.cached_tokens``; the text is the same."""
    start = f"Request {uuid.uuid4().hex}: " + "the quick brown fox jumps over the lazy dog. " * 4
    first_text, _, first = chat(client, messages=[{"role": "user", "content": start + "One."}], max_tokens=8,
                                temperature=0)
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nobody sent this start before
    again_text, _, again = chat(client, messages=[{"role": "user", "content": start + "One."}], max_tokens=8,
                                temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached and cached % 16 == 0 and cached < again.usage.prompt_tokens
    assert again_text == first_text
    texts, _, chunks = stream_chat(client, messages=[{"role": "user", "content": start + "One."}], n=2,
                                   max_tokens=4, temperature=0, stream_options={"include_usage": True})
    assert texts[0] == texts[1]
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    # The same prompt matches the same blocks, counted once for the prompt, not once per choice.
    assert usage.prompt_tokens_details.cached_tokens == cached


def test_raw_sse_ends_with_done(stack: str) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", stack + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("x-request-id")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        json.loads(line[len("data: "):])


def test_a_finished_job_leaves_nothing_in_redis(stack: str, redis_url: str) -> None:
    """arq's cleanup, and no result record: it would repeat the whole request in Redis."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", stack + "/v1/chat/completions", json=body, timeout=30) as r:
        request_id = r.headers["x-request-id"]
        assert [line for line in r.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    keys = [wire.arq_job_key(request_id), wire.arq_in_progress_key(request_id), wire.arq_retry_key(request_id),
            wire.arq_result_key(request_id)]
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5  # the worker ends the arq job just after its last event
    while client.exists(*keys) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.exists(*keys) == 0


def test_max_tokens_gives_length_and_exact_usage(client: openai.OpenAI) -> None:
    for kwargs in ({"max_tokens": 7}, {"max_completion_tokens": 7}):
        _, finish, r = chat(client, temperature=0, extra_body={"ignore_eos": True}, **kwargs)
        assert finish == "length"
        assert r.usage.completion_tokens == 7


def test_stop_string_is_cut_and_never_sent(client: openai.OpenAI) -> None:
    full, _, _ = chat(client, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    stop = full[10:13]  # three characters in the middle: usually across a token boundary
    expected = full[: full.find(stop)]
    text, finish, _ = chat(client, max_tokens=40, temperature=0, stop=[stop, "never-appears"],
                           extra_body={"ignore_eos": True})
    assert (text, finish) == (expected, "stop")
    texts, finishes, _ = stream_chat(client, max_tokens=40, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True})
    assert (texts[0], finishes[0]) == (expected, "stop")


def test_n_choices_stream_and_not(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=8, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    texts, finishes, chunks = stream_chat(client, n=2, max_tokens=8, temperature=1.0, seed=3)
    assert set(texts) == {0, 1} and set(finishes) == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1]


def test_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    a, _, _ = chat(client, max_tokens=16, temperature=1.0, seed=1234)
    b, _, _ = chat(client, max_tokens=16, temperature=1.0, seed=1234)
    c, _, _ = chat(client, max_tokens=16, temperature=1.0, seed=4321)
    assert a == b and a != c


def test_completions_stream_and_non_stream(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["The capital", "Numbers: 1 2"], n=2, max_tokens=6,
                                  temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    stream = client.completions.create(model=MODEL, prompt=["The capital", "Numbers: 1 2"], n=2, max_tokens=6,
                                       temperature=0, stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(4)] == [c.text for c in r.choices]
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        chat(client, model="no-such-model")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        chat(client, messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=5)
    assert long_prompt.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(client, max_tokens=100_000)
    assert too_many.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as temp:
        chat(client, temperature=5)
    assert temp.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as stream_long:
        stream_chat(client, messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=5)
    assert stream_long.value.code == "context_length_exceeded"


def test_models_lists_live_model(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list().data]


def _silent_after(redis_url: str, request_id: str, seconds: float) -> bool:
    """True when no event of ``request_id`` is published during ``seconds``."""
    pubsub = redis.Redis.from_url(redis_url).pubsub()
    pubsub.psubscribe(wire.REPLY_CHANNEL_PATTERN)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if (message and message["type"] == "pmessage"
                and any(rid == request_id for rid, _ in wire.parse_events(message["data"]))):
            return False
    return True


def test_stream_disconnect_cancels_generation(stack: str, redis_url: str) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", stack + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first[6:])["id"]
        # While streaming, events are flowing...
        assert not _silent_after(redis_url, request_id, 0.5)
    # ...and within a second of the client leaving, the worker has stopped producing them.
    time.sleep(1.0)
    assert _silent_after(redis_url, request_id, 1.0)


def test_non_stream_disconnect_cancels_generation(stack: str, redis_url: str) -> None:
    cancels = redis.Redis.from_url(redis_url).pubsub()
    cancels.subscribe(wire.CANCEL_CHANNEL)
    cancels.get_message(timeout=1)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack + "/v1/chat/completions", json=body, timeout=1.0)
    message = None
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not (message and message["type"] == "message"):
        message = cancels.get_message(timeout=0.2)
    assert message is not None and message["type"] == "message"
    request_id = message["data"].decode()
    time.sleep(1.0)
    assert _silent_after(redis_url, request_id, 1.0)


def test_killed_worker_ends_request_with_error(redis_url: str, log_dir: Path, tiny_model: Path, stack: str) -> None:
    worker = start_worker(redis_url, log_dir, str(tiny_model), "tiny-doomed")
    client = openai.OpenAI(base_url=stack + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="tiny-doomed", messages=HELLO, max_tokens=3500, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    worker.kill()
    killed = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert time.monotonic() - killed < wire.WORKER_TTL_S + 4
    assert "worker" in str(err.value.message).lower()


def test_two_workers_share_a_queue(redis_url: str, log_dir: Path, tiny_model: Path, stack: str) -> None:
    import concurrent.futures

    workers: list[Proc] = [
        start_worker(redis_url, log_dir, str(tiny_model), "tiny-pair", "--max-batch-size", "1", wait=i == 1)
        for i in range(2)
    ]
    from tests.procs import wait_for_workers, wait_until

    wait_for_workers(redis_url, "tiny-pair", 2)
    client = openai.OpenAI(base_url=stack + "/v1", api_key="x", max_retries=0, timeout=60)

    def one(_: int) -> str:
        r = client.chat.completions.create(model="tiny-pair", messages=HELLO, max_tokens=200, temperature=0,
                                           extra_body={"ignore_eos": True})
        return r.id

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(one, range(4)))

    def served_by() -> list[int]:
        return [sum(1 for i in ids if i in w.log()) for w in workers]

    # A worker logs a job after ending it in arq, which is after the client has its answer.
    wait_until(lambda: sum(served_by()) == 4, 10, "every job in a worker's log")
    served = served_by()
    for w in workers:
        w.stop()
    # Each worker takes one job at a time, so the other must have taken some.
    assert sum(served) == 4 and min(served) >= 1, served


def test_a_request_past_the_job_timeout_ends_with_a_clear_error(stack: str, redis_url: str, log_dir: Path,
                                                                 tiny_model: Path) -> None:
    worker = start_worker(redis_url, log_dir, str(tiny_model), "tiny-slow", "--job-timeout", "1")
    try:
        client = openai.OpenAI(base_url=stack + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tiny-slow", messages=HELLO, max_tokens=3500, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        text = ""
        started = time.monotonic()
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        assert caught.value.code == "job_timeout"
        assert "job timeout (1 s)" in caught.value.message
        assert text  # it did generate, for about a second
        assert time.monotonic() - started < 10
        with pytest.raises(openai.APIStatusError) as refused:  # not streamed: the HTTP status says it
            client.chat.completions.create(model="tiny-slow", messages=HELLO, max_tokens=3500, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert refused.value.status_code == 504
        assert refused.value.response.headers["x-should-retry"] == "false"  # the SDKs would retry a 504
    finally:
        worker.stop()


def test_the_bench_load_generator_measures_streams_and_refusals(stack: str) -> None:
    from bench.loadgen import run_load

    res = asyncio.run(run_load(stack + "/v1", MODEL, 3, 2, 8, extra_body={"ignore_eos": True}, system="e2e"))
    assert (res.requests, res.completed, res.errors) == (6, 6, 0), res.error_samples
    assert res.output_tokens == 48  # from the usage chunk, over keep-alive connections reused once each
    assert res.ttft_ms["p50"] is not None and res.ttft_ms["p50"] > 0
    assert res.itl_ms["p50"] is not None and res.tokens_per_request["min"] == res.tokens_per_request["max"] == 8
    refused = asyncio.run(run_load(stack + "/v1", "no-such-model", 1, 2, 8, system="e2e"))
    assert (refused.completed, refused.errors) == (0, 2)
    assert refused.error_samples[0].startswith("HTTP 404") and "no-such-model" in refused.error_samples[0]
