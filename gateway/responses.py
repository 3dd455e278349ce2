"""Worker events → OpenAI response bodies and stream chunks, in OpenAI's exact shapes.

Pure data in, data out: no I/O here, so every shape can be checked without a server.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Literal

Event = dict[str, Any]
Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class ResponseMeta:
    kind: Kind
    id: str
    created: int
    model: str
    choice_count: int
    logprobs: bool  # the client asked for logprobs
    include_usage: bool = False
    max_tokens_param: str = "max_tokens"  # the field that set the completion budget, for errors


def _usage(event: Event, prompt_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage from a done event (``prompt_tokens``: what the started event said, if
    the done event says nothing)."""
    prompt = int(event.get("prompt_tokens") or prompt_tokens or 0)
    completion = int(event.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(event.get("cached_tokens") or 0)},
    }


def _delta_choices(event: Event) -> list[dict[str, Any]]:
    choices = event.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _logprob_entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
    entries = choice.get("logprobs")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _tool_calls(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole calls a delta completed (see ``wire.choice_delta``), well-formed ones only."""
    calls = choice.get("tool_calls")
    if not isinstance(calls, list):
        return []
    return [c for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)
            and isinstance(c.get("arguments"), str)]


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(call.get("id", "")), "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def _entry_bytes(entry: dict[str, Any]) -> bytes:
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in raw):
        return bytes(raw)
    return str(entry.get("token", "")).encode()


class TextOffsets:
    """One choice's completions ``text_offset``: where each token starts in the text actually sent.

    Fed every delta of the choice in order, the stream and the non-stream response compute the
    same offsets. Within a delta (an echoed prompt brings many tokens at once) the tokens' raw
    bytes are decoded in sequence and a token advances the position by the text it completes,
    when the delta's text shows that text there: a special token (left out of the text), a token
    holding part of a character (its text comes with a later token) or text a stop string cut
    off does not advance it, so an offset never points past the text.
    """

    def __init__(self) -> None:
        self.length = 0  # characters sent so far
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, entries: list[dict[str, Any]], text: str) -> list[int]:
        """The offsets of a delta's tokens, given the delta's text."""
        offsets: list[int] = []
        at = 0
        for entry in entries:
            offsets.append(self.length + at)
            piece = self._decoder.decode(_entry_bytes(entry))
            if piece and text.startswith(piece, at):
                at += len(piece)
        self.length += len(text)
        return offsets


def completion_logprobs(entries: list[dict[str, Any]], offsets: list[int]) -> dict[str, Any]:
    """The legacy completions shape; ``offsets`` are the tokens' ``text_offset`` (see TextOffsets)."""
    shape: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry, offset in zip(entries, offsets, strict=True):
        shape["tokens"].append(str(entry.get("token", "")))
        shape["token_logprobs"].append(entry.get("logprob"))
        shape["top_logprobs"].append({str(t.get("token")): t.get("logprob")
                                      for t in entry.get("top_logprobs") or [] if isinstance(t, dict)})
        shape["text_offset"].append(offset)
    return shape


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    offsets: TextOffsets = field(default_factory=TextOffsets)
    text_offset: list[int] = field(default_factory=list)  # completions: one per logprobs entry
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class Collector:
    """Gathers a whole request's events into one non-streaming response body."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self._choices = {i: _Choice() for i in range(meta.choice_count)}
        self._prompt_tokens = 0
        self._usage: dict[str, Any] | None = None  # from the done event

    def add(self, event: Event) -> None:
        kind = event.get("type")
        if kind == "started":
            self._prompt_tokens = int(event.get("prompt_tokens") or 0)
        elif kind == "delta":
            for delta in _delta_choices(event):
                choice = self._choices.setdefault(int(delta.get("index", 0)), _Choice())
                text = str(delta.get("text") or "")
                entries = _logprob_entries(delta)
                choice.text.append(text)
                choice.logprobs.extend(entries)
                choice.text_offset.extend(choice.offsets.add(entries, text))
                choice.tool_calls.extend(_openai_call(c) for c in _tool_calls(delta))
                if delta.get("finish_reason"):
                    choice.finish_reason = str(delta["finish_reason"])
        elif kind == "done":
            self._usage = _usage(event, self._prompt_tokens)

    def body(self) -> dict[str, Any]:
        meta = self.meta
        choices = [self._choice(i, c) for i, c in sorted(self._choices.items())]
        return {
            "id": meta.id,
            "object": "chat.completion" if meta.kind == "chat" else "text_completion",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": self._usage or _usage({}, self._prompt_tokens),
        }

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        if self.meta.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if choice.tool_calls:
                # OpenAI's shape for a pure call: no text is null content, not "".
                message.update(content=text or None, tool_calls=choice.tool_calls)
            return {
                "index": index,
                "message": message,
                "logprobs": {"content": choice.logprobs} if self.meta.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
        return {
            "index": index,
            "text": text,
            "logprobs": completion_logprobs(choice.logprobs, choice.text_offset) if self.meta.logprobs else None,
            "finish_reason": choice.finish_reason,
        }


class ChunkWriter:
    """Turns events into stream chunks, one choice per chunk as OpenAI streams them."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self._offsets: dict[int, TextOffsets] = {}

    def chunks(self, event: Event) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "started" and self.meta.kind == "chat":
            role = {"role": "assistant", "content": ""}
            return [self._chat_chunk(i, role, None, None) for i in range(self.meta.choice_count)]
        if kind == "delta":
            out: list[dict[str, Any]] = []
            for delta in _delta_choices(event):
                out.extend(self._choice_chunks(delta))
            return out
        if kind == "done" and self.meta.include_usage:
            return [self._envelope([], _usage(event))]
        return []

    def _choice_chunks(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        index = int(delta.get("index", 0))
        text = str(delta.get("text") or "")
        entries = _logprob_entries(delta)
        finish = delta.get("finish_reason") or None
        out = []
        if text or entries:
            if self.meta.kind == "chat":
                logprobs = {"content": entries} if self.meta.logprobs else None
                out.append(self._chat_chunk(index, {"content": text}, logprobs, None))
            else:
                offsets = self._offsets.setdefault(index, TextOffsets()).add(entries, text)
                logprobs = completion_logprobs(entries, offsets) if self.meta.logprobs else None
                out.append(self._text_chunk(index, text, logprobs, None))
        if self.meta.kind == "chat":
            for call in _tool_calls(delta):
                out.extend(self._tool_call_chunks(index, call))
        if finish:
            if self.meta.kind == "chat":
                out.append(self._chat_chunk(index, {}, None, finish))
            else:
                out.append(self._text_chunk(index, "", None, finish))
        return out

    def _tool_call_chunks(self, index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
        """OpenAI streams a call as a header (id, name, empty arguments) then argument pieces,
        all keyed by the call's index; the SDK's accumulators join them by that index."""
        k = int(call.get("index", 0))
        head = {"index": k, "id": str(call.get("id", "")), "type": "function",
                "function": {"name": call["name"], "arguments": ""}}
        body = {"index": k, "function": {"arguments": call["arguments"]}}
        return [self._chat_chunk(index, {"tool_calls": [head]}, None, None),
                self._chat_chunk(index, {"tool_calls": [body]}, None, None)]

    def _chat_chunk(
        self, index: int, delta: dict[str, Any], logprobs: Any, finish: str | None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope([choice], None)

    def _text_chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope([choice], None)

    def _envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.meta.id,
            "object": "chat.completion.chunk" if self.meta.kind == "chat" else "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.meta.include_usage:
            chunk["usage"] = usage
        return chunk
