"""Incremental detokenization and stop strings: text out as tokens come, never half a character."""

from __future__ import annotations

from typing import Any

# How many prompt tokens seed the decoder: SentencePiece-style tokenizers drop a leading space
# when a fragment is decoded on its own, so each delta is decoded with some context before it.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """TGI's prefix/read-offset scheme: decode a sliding window, emit only completed text.

    ``add`` returns the new text, or ``""`` while the last tokens end inside a UTF-8 sequence
    (the decoder shows U+FFFD for those); the held-back bytes come out with a later token.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""


class StopText:
    """Holds back text that might be the start of a stop string, so a stop is never sent.

    A stop string may span tokens and deltas: ``feed`` searches the held-back text plus the
    new text, returns what is safe to send, and whether a stop string was found.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [pos for stop in self._stops if (pos := buf.find(stop)) >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:size]):
                    hold = size
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """At the end of generation without a stop, the held-back text belongs to the answer."""
        text, self._pending = self._pending, ""
        return text
