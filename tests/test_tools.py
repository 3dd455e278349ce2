"""Tool calling: the worker's parser and prompt rendering on their own, then the whole path on real parts.

The tiny random model never chooses to call a tool, so end to end the forced modes ("required", a
named function) are what can be checked: their grammar guarantees the call. "auto" parsing is
checked on texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.procs import serving
from tokenrelay import wire
from worker import tools
from worker.tools import ToolCallParser, parse_tool_calls

MODEL = "tiny-tools"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
NAMES = set(SCHEMAS)


# ---- the parser -----------------------------------------------------------------------------

def _block(name: str, arguments: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_hermes_block_with_text_before() -> None:
    content, calls = parse_tool_calls("Let me check.\n" + _block("get_weather", {"city": "Paris"}), NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29 and calls[0].id[5:].isalnum()


def test_several_blocks_and_no_content() -> None:
    text = "\n" + _block("add", {"a": 1, "b": 2}) + "\n" + _block("get_weather", {"city": "Oslo"}) + "\n"
    content, calls = parse_tool_calls(text, NAMES)
    assert content is None and [c.name for c in calls] == ["add", "get_weather"]
    assert len({c.id for c in calls}) == 2
    _, one = parse_tool_calls(text, NAMES, parallel=False)
    assert [c.name for c in one] == ["add"]


def test_bare_json_object_and_list() -> None:
    content, calls = parse_tool_calls(' {"name": "add", "arguments": {"a": 1, "b": 2}}', NAMES)
    assert content is None and json.loads(calls[0].arguments) == {"a": 1, "b": 2}
    listed = json.dumps([{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "parameters": {}}])
    assert [c.name for c in parse_tool_calls(listed, NAMES)[1]] == ["add", "get_weather"]
    # arguments sent as a JSON string are normalised to the same JSON text
    stringly = json.dumps({"name": "add", "arguments": json.dumps({"a": 3})})
    assert json.loads(parse_tool_calls(stringly, NAMES)[1][0].arguments) == {"a": 3}


@pytest.mark.parametrize("text", [
    "Just text, no calls at all.\n",
    '{"answer": 42}',  # JSON, but not a call
    '{"name": "unknown_tool", "arguments": {}}',
    '[{"name": "add", "arguments": {}}, {"name": "nope", "arguments": {}}]',
    "<tool_call>\n{not json}\n</tool_call> trailing",
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
    "a < b and <tool_ is not a tag",
])
def test_malformed_or_unknown_stays_plain_content(text: str) -> None:
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_mixed_content_around_a_call() -> None:
    text = "Sure! " + _block("add", {"a": 1, "b": 2}) + " Anything else?"
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Sure! Anything else?" and [c.name for c in calls] == ["add"]


def test_unclosed_block_at_stop_is_a_call_but_at_length_is_text() -> None:
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
    parser = ToolCallParser(NAMES)
    assert parser.feed(text) == ("", [])
    rest, calls, reason = parser.finish("stop")
    assert (rest, [c.name for c in calls], reason) == ("", ["add"], "tool_calls")
    cut = ToolCallParser(NAMES)
    assert cut.feed(text[:30]) == ("", [])
    assert cut.finish("length")[::2] == (text[:30], "length")


def test_streaming_char_by_char_matches_whole_and_never_leaks_markup() -> None:
    text = "Checking <b>now</b>.\n" + _block("get_weather", {"city": "Rome", "unit": "c"}) + "\nDone <t"
    parser = ToolCallParser(NAMES)
    pieces: list[str] = []
    names: list[str] = []
    for ch in text:
        piece, calls = parser.feed(ch)
        assert "<tool_call" not in "".join(pieces) + piece
        pieces.append(piece)
        names += [c.name for c in calls]
    rest, calls, reason = parser.finish("stop")
    pieces.append(rest)
    names += [c.name for c in calls]
    whole, whole_calls = parse_tool_calls(text, NAMES)
    assert "".join(pieces) == whole == "Checking <b>now</b>.\nDone <t"
    assert names == [c.name for c in whole_calls] == ["get_weather"] and reason == "tool_calls"


def test_plain_text_passes_through_exactly() -> None:
    text = "  leading spaces, a { brace later, and trailing space  "
    parser = ToolCallParser(NAMES)
    out = "".join(parser.feed(ch)[0] for ch in text) + parser.finish("length")[0]
    assert out == text


# ---- rendering and the forced schema ----------------------------------------------------------

def _job(**kwargs: Any) -> wire.Job:
    return wire.Job(request_id="r", model="m", kind="chat", deadline=0, **kwargs)


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def test_fallback_rendering_for_a_template_without_tools(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    job = tools.render_job(tokenizer, _job(messages=HISTORY, tools=TOOLS, tool_choice="auto"))
    assert job.tools is None
    system, _, assistant, result = job.messages or []
    assert system["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in system["content"]
    assert "<tool_call>" in system["content"]
    assert assistant["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
                                   '"unit": "c"}}\n</tool_call>'
    assert result == {"role": "tool", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'}
    # tool_choice "none": the model is not told about tools, but the history still renders
    quiet = tools.render_job(tokenizer, _job(messages=HISTORY, tools=TOOLS, tool_choice="none"))
    assert "<tools>" not in (quiet.messages or [])[0]["content"]


def test_tool_role_becomes_user_when_the_template_refuses_it() -> None:
    class Strict:
        chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"

        def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
            if any(m["role"] == "tool" for m in messages):
                raise ValueError("roles must alternate")
            return "ok"

    job = tools.render_job(Strict(), _job(messages=HISTORY, tools=TOOLS, tool_choice="auto"))
    assert [m["role"] for m in job.messages or []] == ["system", "user", "assistant", "user"]


def test_native_rendering_keeps_tools_and_decodes_arguments() -> None:
    class Native:
        chat_template = "{% if tools %}{{ tools }}{% endif %}"

    job = tools.render_job(Native(), _job(messages=HISTORY, tools=TOOLS, tool_choice="auto"))
    assert job.tools == TOOLS
    call = (job.messages or [])[2]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Paris", "unit": "c"}


def test_forced_call_schema() -> None:
    named = tools.forced_call_schema(_job(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}))
    assert named == {"type": "object", "properties": {"name": {"const": "add"}, "arguments": ADD},
                     "required": ["name", "arguments"]}
    required = tools.forced_call_schema(_job(tools=TOOLS, tool_choice="required"))
    assert required is not None and [o["properties"]["name"]["const"] for o in required["anyOf"]] == [
        "get_weather", "add"]
    assert tools.forced_call_schema(_job(tools=TOOLS, tool_choice="auto")) is None


# ---- the gateway's shapes ------------------------------------------------------------------------

def test_gateway_shapes_for_tool_calls() -> None:
    from gateway.responses import ChunkWriter, Collector, ResponseMeta

    call = {"index": 0, "id": "call_x", "name": "add", "arguments": '{"a": 1}'}
    events = [
        wire.started_event(0, worker_id="w", prompt_tokens=3),
        wire.delta_event(1, [wire.choice_delta(0, "", tokens=1)]),
        wire.delta_event(2, [wire.choice_delta(0, "", tokens=1, finish_reason="tool_calls", tool_calls=[call])]),
        wire.done_event(3, prompt_tokens=3, completion_tokens=2),
    ]
    assert "tool_calls" not in wire.choice_delta(0, "x")  # old readers see the old shape
    meta = ResponseMeta(kind="chat", id="chatcmpl-1", created=1, model="m", choice_count=1, logprobs=False)
    collector = Collector(meta)
    for event in events:
        collector.add(event)
    choice = collector.body()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_x", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}
    writer = ChunkWriter(meta)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for e in events for c in writer.chunks(e)]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"tool_calls": [{"index": 0, "id": "call_x", "type": "function",
                          "function": {"name": "add", "arguments": ""}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}, None),
        ({}, "tool_calls"),
    ]


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(redis_url: str, log_dir: Path, tiny_model: Path) -> Iterator[str]:
    with serving(redis_url, log_dir, str(tiny_model), MODEL, "--max-batch-size", "16") as base:
        yield base


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("tools", TOOLS)
    kwargs.setdefault("max_tokens", 300)
    return client.chat.completions.create(**kwargs)


def assert_valid_call(choice: Any, name: str | None = None, content: str | None = None) -> tuple[str, str]:
    assert choice.finish_reason == "tool_calls" and choice.message.content == content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in NAMES and (name is None or call.function.name == name)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call.function.name, call.function.arguments


def test_required_guarantees_a_valid_call(client: openai.OpenAI) -> None:
    r = create(client, tool_choice="required", n=2, temperature=1.0, seed=5)
    for choice in r.choices:
        assert_valid_call(choice)


def test_named_function_is_called(client: openai.OpenAI) -> None:
    r = create(client, tool_choice={"type": "function", "function": {"name": "add"}}, seed=2)
    assert_valid_call(r.choices[0], "add")


def test_stream_reassembles_the_same_call(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                              "seed": 7, "temperature": 1.0}
    expected = assert_valid_call(create(client, **kwargs).choices[0], "get_weather")
    # the SDK's own accumulator
    with client.chat.completions.stream(model=MODEL, messages=HELLO, tools=TOOLS, max_tokens=300,
                                        **kwargs) as stream:
        final = stream.get_final_completion()
    # The stream's first chunk is {"role": "assistant", "content": ""} (as vLLM's), sent before
    # anyone knows whether a call follows, so the SDK's accumulated content is "" rather than None.
    assert assert_valid_call(final.choices[0], "get_weather", content="") == expected
    # by hand, joining delta.tool_calls by index as OpenAI's docs show
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in create(client, stream=True, **kwargs):
        for c in chunk.choices:
            assert not c.delta.content
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == expected


def test_length_returns_no_partial_call(client: openai.OpenAI) -> None:
    r = create(client, tool_choice="required", max_tokens=3, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("{")


def test_auto_and_none_answer_in_text(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        r = create(client, tool_choice=choice, max_tokens=20, seed=3)
        assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
        assert isinstance(r.choices[0].message.content, str)


def test_multi_turn_with_tool_results(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 21}'},
    ]
    r = create(client, messages=messages, max_tokens=10)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    forced = create(client, messages=messages, tool_choice="required", seed=4)
    assert_valid_call(forced.choices[0])


@pytest.mark.parametrize(("change", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    # well-formed, but the worker's grammar compiler refuses the parameters schema
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tools_are_400(stack: str, change: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "tools": TOOLS, **change}
    r = httpx.post(stack + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
