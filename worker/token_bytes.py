"""Each token's own raw bytes, for logprobs' ``bytes``.

A token that holds part of a UTF-8 character decodes alone to U+FFFD, so the UTF-8 of its decoded
text is not its bytes; OpenAI's ``bytes`` let a client rebuild such characters by joining the
tokens' bytes. The bytes come from the token's vocabulary string:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): the string spells bytes in GPT-2's
  ``bytes_to_unicode`` alphabet (``Ġ`` is a space, ``Ã`` the byte C3), inverted here;
* SentencePiece: byte-fallback tokens ``<0xNN>`` are the byte NN, and ``▁`` is a space;
* anything else (added and special tokens, other tokenizers): the UTF-8 of the token decoded alone.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_METASPACE = "\u2581"  # ▁


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (openai/gpt-2, encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The decoder steps of a fast (tokenizers-backed) tokenizer: {"ByteLevel"}, {"Replace:▁",
    "ByteFallback", ...}, plus "ByteFallback" when its model falls back to byte tokens; empty when
    there is no backend to read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        spec = json.loads(backend.to_str())
    except (AttributeError, TypeError, ValueError):
        return set()
    kinds: set[str] = set()
    model = spec.get("model")
    if isinstance(model, dict) and model.get("byte_fallback"):
        kinds.add("ByteFallback")
    decoder = spec.get("decoder")
    steps = [decoder] if isinstance(decoder, dict) else []
    while steps:
        step = steps.pop()
        kind = str(step.get("type"))
        if kind == "Sequence":
            steps.extend(d for d in step.get("decoders") or [] if isinstance(d, dict))
        elif kind == "Replace":
            pattern = step.get("pattern")
            source = pattern.get("String") if isinstance(pattern, dict) else None
            kinds.add(f"Replace:{source}")
        else:
            kinds.add(kind)
    return kinds


class TokenBytes:
    """``token_bytes(token_id)`` → the token's raw bytes; cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        kinds = _decoder_kinds(tokenizer)
        self.byte_level = "ByteLevel" in kinds
        # Slow SentencePiece tokenizers have no backend, but an sp_model.
        sentencepiece = hasattr(tokenizer, "sp_model")
        self.byte_fallback = "ByteFallback" in kinds or sentencepiece
        self.metaspace = "Metaspace" in kinds or f"Replace:{_METASPACE}" in kinds or sentencepiece
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i) for i in added}

    def __call__(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._cache[token_id] = self._compute(token_id)
        return raw

    def _compute(self, token_id: int) -> bytes:
        if token_id not in self._added:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece:
                raw = self._from_piece(piece)
                if raw is not None:
                    return raw
        text: str = self._tokenizer.decode([token_id])
        return text.encode()

    def _from_piece(self, piece: str) -> bytes | None:
        if self.byte_level:
            if all(c in BYTE_DECODER for c in piece):
                return bytes(BYTE_DECODER[c] for c in piece)
            return None
        if self.byte_fallback and (match := _BYTE_FALLBACK.match(piece)):
            return bytes([int(match.group(1), 16)])
        if self.metaspace:
            return piece.replace(_METASPACE, " ").encode()
        return None
