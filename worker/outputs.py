"""What the engine hands back per step: one ``ChoiceOutput`` per choice that made progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.sampling import TokenLogprob


@dataclass
class ChoiceOutput:
    index: int
    text: str
    tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # With echo + logprobs: one entry per prompt token (None for the first, which has no context),
    # sent once, with the choice's first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Prompt tokens whose KV came from the prefix cache, sent once, with the choice's first output.
    cached_tokens: int | None = None


def merge(outputs: list[ChoiceOutput]) -> list[ChoiceOutput]:
    """One output per choice, in order: texts joined, token counts summed."""
    merged: dict[int, ChoiceOutput] = {}
    for o in outputs:
        into = merged.get(o.index)
        if into is None:
            merged[o.index] = ChoiceOutput(o.index, o.text, o.tokens, o.finish_reason, list(o.logprobs),
                                           o.prompt_logprobs, o.cached_tokens)
        else:
            into.text += o.text
            into.tokens += o.tokens
            into.finish_reason = o.finish_reason or into.finish_reason
            into.logprobs.extend(o.logprobs)
            into.prompt_logprobs = into.prompt_logprobs or o.prompt_logprobs
            into.cached_tokens = o.cached_tokens if into.cached_tokens is None else into.cached_tokens
    return list(merged.values())
