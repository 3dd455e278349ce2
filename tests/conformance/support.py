"""Shared by the conformance modules: the served model's name, prompts, and small SDK helpers.

The model is the tests' tiny random Llama: its text is gibberish, but greedy decoding and seeded
sampling are deterministic, so equalities are exact.
"""

from __future__ import annotations

from typing import Any

import openai

MODEL = "tiny-conf"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]
PROMPT = "The quick brown fox"


def client_for(base: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=timeout)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    """A non-streaming chat completion with the module's model and prompt as defaults."""
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", HELLO)
    return client.chat.completions.create(**kwargs)


def chat_text(client: openai.OpenAI, **kwargs: Any) -> str:
    return str(chat(client, **kwargs).choices[0].message.content)


class ChatStream:
    """A streamed chat completion gathered per choice index."""

    def __init__(self, client: openai.OpenAI, **kwargs: Any) -> None:
        kwargs.setdefault("model", MODEL)
        kwargs.setdefault("messages", HELLO)
        self.gather(list(client.chat.completions.create(stream=True, **kwargs)))

    @classmethod
    def of(cls, chunks: list[Any]) -> ChatStream:
        """Gather chunks read elsewhere (e.g. timed while iterating)."""
        stream = cls.__new__(cls)
        stream.gather(chunks)
        return stream

    def gather(self, chunks: list[Any]) -> None:
        self.chunks = chunks
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.roles: dict[int, str] = {}
        self.logprobs: dict[int, list[Any]] = {}
        for chunk in self.chunks:
            for c in chunk.choices:
                self.texts[c.index] = self.texts.get(c.index, "") + (c.delta.content or "")
                if c.delta.role:
                    self.roles[c.index] = c.delta.role
                if c.finish_reason:
                    self.finish[c.index] = c.finish_reason
                if c.logprobs is not None and c.logprobs.content:
                    self.logprobs.setdefault(c.index, []).extend(c.logprobs.content)

    @property
    def text(self) -> str:
        return self.texts.get(0, "")

    @property
    def usage(self) -> Any:
        return self.chunks[-1].usage


def stream_text(client: openai.OpenAI, **kwargs: Any) -> str:
    return ChatStream(client, **kwargs).text


def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("prompt", PROMPT)
    return client.completions.create(**kwargs)


class CompletionStream:
    """A streamed legacy completion gathered per choice index (text, finish, logprobs)."""

    def __init__(self, client: openai.OpenAI, **kwargs: Any) -> None:
        kwargs.setdefault("model", MODEL)
        kwargs.setdefault("prompt", PROMPT)
        self.chunks = list(client.completions.create(stream=True, **kwargs))
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.tokens: dict[int, list[str]] = {}
        self.token_logprobs: dict[int, list[float]] = {}
        self.top_logprobs: dict[int, list[dict[str, float]]] = {}
        self.text_offset: dict[int, list[int]] = {}
        for chunk in self.chunks:
            for c in chunk.choices:
                self.texts[c.index] = self.texts.get(c.index, "") + c.text
                if c.finish_reason:
                    self.finish[c.index] = c.finish_reason
                if c.logprobs is not None:
                    self.tokens.setdefault(c.index, []).extend(c.logprobs.tokens or [])
                    self.token_logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs or [])
                    self.top_logprobs.setdefault(c.index, []).extend(c.logprobs.top_logprobs or [])
                    self.text_offset.setdefault(c.index, []).extend(c.logprobs.text_offset or [])

    @property
    def text(self) -> str:
        return self.texts.get(0, "")
