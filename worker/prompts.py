"""A job's prompts as token ids, and the limits each must fit (context, KV budget)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenrelay.wire import Job
from worker.errors import ContextLengthExceeded, InvalidRequest


@dataclass
class Prompts:
    ids: list[list[int]]
    texts: list[str]  # for echo: each prompt as text
    max_tokens: list[int]  # resolved per prompt

    @property
    def token_count(self) -> int:
        return sum(len(p) for p in self.ids)


def render_chat(tokenizer: Any, job: Job) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            f"The model `{job.model}` has no chat template; use /v1/completions instead.", param="messages"
        )
    try:
        text: str = tokenizer.apply_chat_template(
            job.messages, tools=job.tools or None, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja raises TemplateError for roles the template refuses
        raise InvalidRequest(f"The messages could not be rendered by the model's chat template: {exc}",
                             param="messages") from None
    return text


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``. A fast tokenizer's own Rust ``encode`` gives the ids its ``__call__``
    gives, without the Python around it (padding, truncation, tensors), which a busy worker's
    event loop paid on every request."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize(tokenizer: Any, job: Job) -> tuple[list[list[int]], list[str]]:
    if job.kind == "chat":
        text = render_chat(tokenizer, job)
        # The template already holds BOS and the role markers.
        return [encode(tokenizer, text, add_special_tokens=False)], [text]
    ids: list[list[int]] = []
    texts: list[str] = []
    vocab = len(tokenizer)
    for i, prompt in enumerate(job.prompts or []):
        if isinstance(prompt, str):
            ids.append(encode(tokenizer, prompt))
            texts.append(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"Token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).",
                                     param=f"prompt[{i}]" if len(job.prompts or []) > 1 else "prompt")
            ids.append(list(prompt))
            texts.append(tokenizer.decode(prompt))
    return ids, texts


def prepare(tokenizer: Any, job: Job, *, context_length: int, max_request_tokens: int) -> Prompts:
    """Tokenize and check limits; raises InvalidRequest / ContextLengthExceeded."""
    ids, texts = tokenize(tokenizer, job)
    where = "messages" if job.kind == "chat" else "prompt"
    limit = min(context_length, max_request_tokens)
    resolved: list[int] = []
    for prompt in ids:
        if not prompt:
            raise InvalidRequest("The prompt is empty.", param=where)
        asked = job.sampling.max_tokens
        total = len(prompt) + (asked or 1)
        if total > limit:
            what = "maximum context length" if limit == context_length else "per-request token limit"
            raise ContextLengthExceeded(
                f"This model's {what} is {limit} tokens. However, you requested {total} tokens "
                f"({len(prompt)} in the {where}, {asked or 1} in the completion). "
                f"Please reduce the length of the {where} or completion.",
                param=where if asked is None else "max_tokens",
            )
        resolved.append(asked if asked is not None else limit - len(prompt))
    return Prompts(ids, texts, resolved)
