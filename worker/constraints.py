"""Structured output: JSON grammars compiled by xgrammar, applied per sequence as engine constraints.

A ``Grammars`` lives on the worker's Runtime: it builds xgrammar's tokenizer index once (slow for
big vocabularies, so only when the first structured request arrives), compiles each distinct
schema once (LRU), and hands the engine a factory making one matcher per choice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.errors import InvalidRequest
from worker.sampling import Constraint

log = logging.getLogger(__name__)

ANY_OBJECT = '{"type":"object"}'

_CACHE_SIZE = 64
# xgrammar prefixes its messages with a timestamp and a C++ source location.
_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain a choice to: a JSON schema (as compact JSON text, the cache key).

    ``param`` names the request field it came from, so a schema xgrammar refuses becomes a 400
    pointing at it.
    """

    schema: str
    param: str = "response_format"
    # Strict: no properties beyond those the schema names, as OpenAI's strict mode (the output
    # still validates either way). json_object is not strict, or it could only be "{}".
    strict: bool = True

    @classmethod
    def of(cls, schema: dict[str, Any], param: str) -> GrammarSpec:
        # Keys keep their order: xgrammar emits properties in the order the schema declares them.
        return cls(json.dumps(schema, separators=(",", ":")), param)


def spec_for_response_format(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """The grammar a ``response_format`` asks for; None for plain text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    schema = (response_format.get("json_schema") or {}).get("schema")
    if kind == "json_object" or (kind == "json_schema" and schema is None):
        return GrammarSpec(ANY_OBJECT, strict=False)
    if kind == "json_schema" and isinstance(schema, dict):
        return GrammarSpec.of(schema, "response_format")
    raise InvalidRequest("'response_format' must be text, json_object, or json_schema with an object schema.",
                         param="response_format")


def output_vocab_size(model: Any) -> int:
    """The width of the model's logits, which may exceed the tokenizer's length (padded heads)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(head, "out_features", None)
    return int(size if size is not None else model.config.vocab_size)


def printable_bitmask(decoded_vocab: list[bytes], vocab_size: int, keep: set[int]) -> torch.Tensor:
    """xgrammar's packed bitmask (bit ``i % 32`` of word ``i // 32``) allowing every token but
    those holding a control byte (0x00-0x1f).

    Compact JSON never holds a raw control character (JSON escapes them; whitespace between
    tokens is off), yet xgrammar 0.2.8 lets them into strings with minLength/maxLength (its rule
    there is ``[^"\\\r\n]``), which makes output json.loads refuses. ``keep`` (EOS) stays allowed.
    """
    import numpy as np

    allowed = np.ones(-(-vocab_size // 32) * 32, dtype=np.bool_)
    for token_id, piece in enumerate(decoded_vocab[:vocab_size]):
        if token_id not in keep and any(byte < 0x20 for byte in piece):
            allowed[token_id] = False
    words = np.packbits(allowed, bitorder="little").view("<i4").astype(np.int32)
    return torch.from_numpy(words).unsqueeze(0)


class GrammarConstraint:
    """One sequence's grammar state (xgrammar's ``GrammarMatcher``) behind the engine's hook."""

    def __init__(self, compiled: Any, vocab_size: int, printable: torch.Tensor) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._printable = printable
        self._device_bitmask: torch.Tensor | None = None
        self._vocab_size = vocab_size
        self._warned = False

    def mask(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._bitmask &= self._printable
        bitmask = self._bitmask
        if logits.device.type != "cpu":
            if self._device_bitmask is None:
                self._device_bitmask = torch.empty_like(bitmask, device=logits.device)
            bitmask = self._device_bitmask.copy_(self._bitmask, non_blocking=True)
        row = logits.unsqueeze(0)
        self._xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=self._vocab_size)
        if self._matcher.is_completed() and bool(torch.isinf(row).all()):
            # The grammar allows only EOS and min_tokens/ignore_eos banned it: sampling would fail
            # on a row of -inf, so the grammar wins (the choice ends with "stop").
            row.zero_()
            self._xgr.apply_token_bitmask_inplace(row, bitmask, vocab_size=self._vocab_size)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id) and not self._warned:
            self._warned = True
            log.warning("grammar refused token %d; the rest of this choice is unconstrained", token_id)


class Grammars:
    """xgrammar's tokenizer index and compiler for one worker, with an LRU of compiled schemas.

    ``stop_token_ids`` are the engine's EOS ids: once a grammar is complete the matcher allows
    only those, so the engine ends the choice with ``finish_reason="stop"``.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: set[int]) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.printable = printable_bitmask(info.decoded_vocab, vocab_size, stop_token_ids)
        # Our own LRU bounds memory; xgrammar's cache would grow without limit by default.
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (cached); raises InvalidRequest when xgrammar refuses the schema.

        Blocking (milliseconds to a second for big schemas): call it off the event loop.
        """
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            # Compact JSON: free whitespace would let a weak model spend max_tokens on spaces.
            compiled = self._compiler.compile_json_schema(spec.schema, any_whitespace=False,
                                                          strict_mode=spec.strict)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _XGR_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidRequest(f"Invalid JSON schema in '{spec.param}': {reason}", param=spec.param) from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def factory(self, compiled: Any) -> Callable[[], Constraint]:
        """What ``Engine.generate(constraint=...)`` takes: one fresh matcher per choice."""

        def make() -> Constraint:
            return GrammarConstraint(compiled, self.vocab_size, self.printable)

        return make
