"""Structured output (response_format) on real parts: SDK -> gateway -> arq/Redis -> worker with xgrammar.

The tiny random model writes junk, so every valid answer here is the grammar's doing. Schemas bound
their strings and arrays so a choice always closes its JSON well before max_tokens.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.procs import serving

MODEL = "tiny-structured"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def stack(redis_url: str, log_dir: Path, tiny_model: Path) -> Iterator[str]:
    with serving(redis_url, log_dir, str(tiny_model), MODEL, "--max-batch-size", "16") as base:
        yield base


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", HELLO)
    return client.chat.completions.create(**kwargs)


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in create(client, stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish


@pytest.mark.parametrize("fmt", [{"type": "json_object"}, PERSON_FORMAT], ids=["json_object", "json_schema"])
def test_output_parses_and_validates_stream_and_not(client: openai.OpenAI, fmt: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"n": 2, "max_tokens": 400, "temperature": 1.0, "seed": 0, "response_format": fmt}
    r = create(client, **kwargs)
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    for choice in r.choices:
        value = json.loads(choice.message.content)
        assert isinstance(value, dict)
        if fmt is PERSON_FORMAT:
            jsonschema.validate(value, PERSON)
    assert r.choices[0].message.content != r.choices[1].message.content  # each choice has its own matcher
    texts, finishes = streamed(client, **kwargs)
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    assert finishes == {0: "stop", 1: "stop"}


def test_greedy_schema_output(client: openai.OpenAI) -> None:
    r = create(client, max_tokens=400, temperature=0, response_format=PERSON_FORMAT)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_max_tokens_cuts_the_json_with_length(client: openai.OpenAI) -> None:
    r = create(client, max_tokens=4, seed=0, response_format=PERSON_FORMAT)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert r.choices[0].message.content.startswith("{")


def test_completions_take_response_format(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital", max_tokens=400, seed=1,
                                  extra_body={"response_format": PERSON_FORMAT})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_schemas_are_400(stack: str, stream: bool) -> None:
    def post(fmt: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "response_format": fmt, "stream": stream}
        return httpx.post(stack + "/v1/chat/completions", json=body, timeout=30)

    bad = [
        # refused by the gateway's structural check
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": 5}}}},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {"type": "object"}}},
        {"type": "json_schema"},
        {"type": "yaml"},
        # well-formed, but the worker's grammar compiler refuses it
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
    ]
    for fmt in bad:
        r = post(fmt)
        assert r.status_code == 400, (fmt, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "response_format", error


def test_structured_and_plain_requests_share_the_batch(client: openai.OpenAI) -> None:
    def plain(i: int) -> Any:
        return create(client, max_tokens=120, temperature=1.0, seed=i, extra_body={"ignore_eos": True})

    def structured(i: int) -> Any:
        fmt = PERSON_FORMAT if i % 2 else {"type": "json_object"}
        return create(client, max_tokens=400, temperature=1.0, seed=i, response_format=fmt)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        plains = [pool.submit(plain, i) for i in range(4)]
        structs = [pool.submit(structured, i) for i in range(4)]
        plain_results = [f.result() for f in plains]
        struct_results = [f.result() for f in structs]
    for r in plain_results:
        # ignore_eos without a grammar: the full budget, whatever the text
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 120
    for i, r in enumerate(struct_results):
        value = json.loads(r.choices[0].message.content)
        assert isinstance(value, dict)
        if i % 2:
            jsonschema.validate(value, PERSON)
