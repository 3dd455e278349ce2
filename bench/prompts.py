"""The chat prompts every system gets: short requests that invite a long answer."""

from __future__ import annotations

from typing import Any

TOPICS = [
    "ocean",
    "forest",
    "city",
    "moon",
    "river",
    "music",
    "winter",
    "garden",
    "train",
    "mountain",
    "desert",
    "library",
    "market",
    "island",
    "storm",
    "bridge",
]


def chat_messages(count: int) -> list[list[dict[str, Any]]]:
    """``count`` one-turn conversations, cycling through the topics (same length in tokens)."""
    return [
        [{"role": "user", "content": f"Write a long, detailed story about a {TOPICS[i % len(TOPICS)]}."}]
        for i in range(count)
    ]


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids as the worker makes them: chat template text, then no extra special tokens."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
