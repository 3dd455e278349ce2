"""Tool calling: prompt rendering, the forced-call schema, and parsing calls out of generated text.

The model's side is the Hermes convention (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
which Qwen, Hermes and most open chat templates use), plus a bare JSON object naming a tool, which
is also what the forced-call grammar produces. The client's side is OpenAI's: the worker sends
each completed call whole in its ``delta`` event and the gateway shapes it.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass, replace
from typing import Any

from tokenrelay.wire import Job
from worker.errors import InvalidRequest

log = logging.getLogger(__name__)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_ALPHANUM = string.ascii_letters + string.digits

# Hermes's own system prompt, for templates that know nothing of tools.
_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_wire(self, index: int) -> dict[str, Any]:
        return {"index": index, "id": self.id, "name": self.name, "arguments": self.arguments}


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHANUM) for _ in range(24))


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [str(t["function"]["name"]) for t in tools or [] if isinstance(t.get("function"), dict)]


def calls_possible(job: Job) -> bool:
    """Whether this job's output is searched for tool calls."""
    return bool(job.kind == "chat" and job.tools and job.tool_choice != "none")


def forced_call_schema(job: Job) -> dict[str, Any] | None:
    """For tool_choice "required" or a named function, the JSON schema every choice must follow:
    ``{"name": <a tool>, "arguments": <that tool's parameters>}``. One call per choice."""
    if not job.tools or job.tool_choice in (None, "none", "auto"):
        return None
    if isinstance(job.tool_choice, dict):
        wanted = {str((job.tool_choice.get("function") or {}).get("name"))}
    else:  # "required"
        wanted = set(tool_names(job.tools))
    options = []
    for tool in job.tools:
        function = tool.get("function") or {}
        if function.get("name") in wanted:
            # Arguments are always an object, even when the parameters schema leaves type out.
            params = function.get("parameters") or {}
            params = params if "type" in params else {"type": "object", **params}
            options.append({
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": params},
                "required": ["name", "arguments"],
            })
    if not options:
        raise InvalidRequest("tool_choice names a function that is not in tools.", param="tool_choice")
    return options[0] if len(options) == 1 else {"anyOf": options}


# ---- rendering ------------------------------------------------------------------------------

def render_job(tokenizer: Any, job: Job) -> Job:
    """The job with messages and tools in a form the model's chat template can render.

    Templates that know tools get them with assistant call arguments as objects (what Hugging
    Face templates expect); other templates get Hermes text: a system prompt listing the tools,
    ``<tool_call>`` blocks in assistant turns and ``<tool_response>`` blocks for results.
    """
    messages = job.messages or []
    history = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if job.kind != "chat" or not (job.tools or history):
        return job
    # With tool_choice "none" nothing is parsed, so the model is not told about tools at all.
    tools = job.tools if job.tool_choice != "none" else None
    template = getattr(tokenizer, "chat_template", None) or ""
    if "tools" in str(template):
        return replace(job, tools=tools, messages=[_native(m) for m in messages])
    rendered = [_hermes(m) for m in messages]
    if tools:
        prompt = _SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{prompt}"}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    if any(m["role"] == "tool" for m in rendered) and not _renders(tokenizer, rendered):
        # Many templates accept only system/user/assistant: results go in as the user's turn.
        rendered = [{**m, "role": "user"} if m["role"] == "tool" else m for m in rendered]
    return replace(job, tools=None, messages=rendered)


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _native(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        function["arguments"] = _arguments_object(function.get("arguments"))
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}


def _hermes(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = []
    for call in calls:
        function = call.get("function") or {}
        body = {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments"))}
        blocks.append(f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}")
    text = "\n".join([message["content"], *blocks] if message.get("content") else blocks)
    return {"role": "assistant", "content": text}


def _renders(tokenizer: Any, messages: list[dict[str, Any]]) -> bool:
    try:
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:
        return False
    return True


# ---- parsing --------------------------------------------------------------------------------

def _call_from(value: Any, names: set[str]) -> ToolCall | None:
    """A call from a decoded ``{"name": ..., "arguments": ...}``; None unless it names a tool."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    arguments = _arguments_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), str(value["name"]), json.dumps(arguments, ensure_ascii=False))


def _calls_from_json(text: str, names: set[str]) -> list[ToolCall] | None:
    """Calls when ``text`` is exactly one call object or a list of them; else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) and value else [value]
    calls = [_call_from(item, names) for item in items]
    return [c for c in calls if c is not None] if all(calls) else None


def parse_tool_calls(text: str, names: set[str], *, parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """A whole output → (content or None, calls): what the incremental parser yields in total."""
    parser = ToolCallParser(names, parallel=parallel)
    content, calls = parser.feed(text)
    rest, more, _ = parser.finish("stop")
    content += rest
    return (content or None), calls + more


class ToolCallParser:
    """Splits one choice's streamed text into content and tool calls as the text arrives.

    Text that may still turn into a call is held back: a possible ``<tool_call>`` opening at the
    end, a block until its ``</tool_call>``, and an output that starts with ``{`` or ``[`` (a
    bare JSON call) until the end. A block or JSON that is not a valid call of a known tool is
    given back as plain text. Whitespace around calls is dropped, so a pure call has no content.
    """

    def __init__(self, names: set[str], *, parallel: bool = True) -> None:
        self._names = names
        self._parallel = parallel
        self._buf = ""
        self._mode = "start"  # start (only whitespace so far) | json | text | block
        self.calls = 0

    def _accept(self, call: ToolCall | None, out: list[ToolCall]) -> bool:
        if call is None:
            return False
        if self._parallel or self.calls == 0:
            out.append(call)
            self.calls += 1
        else:
            log.info("dropping tool call %r: parallel_tool_calls is false", call.name)
        return True

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """New text in → (content safe to send now, calls completed now)."""
        self._buf += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if not head:
                    break
                self._mode = "json" if head[0] in "{[" else "text"
            elif self._mode == "json":
                break
            elif self._mode == "text":
                at = self._buf.find(OPEN)
                if at >= 0:
                    before = self._buf[:at]
                    out.append(before.rstrip() if before.strip() else "")
                    self._buf, self._mode = self._buf[at:], "block"
                    continue
                out.append(self._release())
                break
            else:  # block
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                block, self._buf = self._buf[: end + len(CLOSE)], self._buf[end + len(CLOSE):]
                if not self._accept(_call_from(_loads(block[len(OPEN): -len(CLOSE)]), self._names), calls):
                    out.append(block)
                self._mode = "text"
        return "".join(out), calls

    def _release(self) -> str:
        """Text mode: everything but trailing whitespace and a possible ``<tool_call>`` prefix."""
        buf = self._buf
        hold = next((n for n in range(min(len(OPEN) - 1, len(buf)), 0, -1) if buf.endswith(OPEN[:n])), 0)
        cut = len(buf) - hold
        cut = len(buf[:cut].rstrip()) if buf[:cut].strip() else 0
        self._buf = buf[cut:]
        return buf[:cut]

    def finish(self, finish_reason: str) -> tuple[str, list[ToolCall], str]:
        """The end of the choice → (held-back text, last calls, the finish_reason to report).

        Cut by max_tokens ("length"), an unfinished call is given back as text.
        """
        buf, self._buf = self._buf, ""
        calls: list[ToolCall] = []
        if finish_reason != "length":
            if self._mode == "json":
                found = _calls_from_json(buf, self._names)
                if found is not None:
                    for call in found:
                        self._accept(call, calls)
                    buf = ""
            elif self._mode == "block" and self._accept(
                    _call_from(_loads(buf[len(OPEN):].removesuffix(CLOSE)), self._names), calls):
                buf = ""  # a call whose closing tag never came (the model stopped right after it)
        if self.calls and not buf.strip():
            buf = ""
        reason = "tool_calls" if self.calls and finish_reason != "length" else finish_reason
        return buf, calls, reason


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
