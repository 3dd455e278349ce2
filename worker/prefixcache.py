"""Prompt prefixes' KV, kept so that prompts that start alike skip recomputing their start.

Chat prompts share their start: the template, a system prompt, a few-shot preamble. On a CPU a
prefill is compute-bound (SmolLM2 on two CPUs: ~100 ms for 35 tokens, against ~65 ms for a
decode step of 8 rows), so every prompt token not recomputed is time given back to decoding.
This is vLLM's automatic prefix caching, over tensors instead of pages: the engine copies a
cached prefix into a new row's cache and prefills only the rest (worker/engine.py: _prefill).

Prefixes are kept and matched in whole blocks of ``BLOCK`` tokens (vLLM's default block size).
Each block boundary's key is a hash chained over the blocks before it, so a lookup is one pass
over the prompt; an entry found is compared token by token before use, so a hash collision
costs a miss, never a wrong answer. Entries are dropped least recently used first, once their
tokens pass ``max_tokens``. The engine thread alone uses it: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys and values, [heads, tokens, head dim]


@dataclass
class _Entry:
    ids: tuple[int, ...]  # a whole number of blocks
    kv: list[LayerKV]  # one pair per layer, exactly len(ids) tokens
    keys: list[int]  # the chained hash at each block boundary


def _chain(ids: list[int], tokens: int) -> list[int]:
    keys: list[int] = []
    h = 0
    for start in range(0, tokens, BLOCK):
        h = hash((h, *ids[start:start + BLOCK]))
        keys.append(h)
    return keys


class PrefixCache:
    """Keyword-only argument ``max_tokens``: most cached tokens (memory: tokens x the model's
    KV bytes per token)."""

    def __init__(self, *, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by deepest key, oldest use first
        self._by_key: dict[int, _Entry] = {}
        self.tokens = 0
        self.hit_tokens = 0  # prompt tokens not recomputed, since start (tests, diagnostics)

    def match(self, ids: list[int]) -> tuple[int, list[LayerKV]]:
        """The longest cached prefix of ``ids`` that leaves at least one token to compute (the
        prefill needs the last one's logits): its length (0: none) and its per-layer views."""
        usable = (len(ids) - 1) // BLOCK * BLOCK
        if not self._by_key or usable <= 0:
            return 0, []
        keys = _chain(ids, usable)
        for depth in range(len(keys), 0, -1):
            entry = self._by_key.get(keys[depth - 1])
            n = depth * BLOCK
            if entry is not None and entry.ids[:n] == tuple(ids[:n]):
                self._entries.move_to_end(entry.keys[-1])
                return n, [(k[:, :n], v[:, :n]) for k, v in entry.kv]
        return 0, []

    def wanted(self, ids: list[int], have: int) -> int:
        """How many of ``ids``' tokens to ``store`` (whole blocks), or 0: nothing new, since
        ``have`` of them came from here or an entry holds them already, or it would not fit."""
        n = len(ids) // BLOCK * BLOCK
        if n <= have or n > self.max_tokens:
            return 0
        entry = self._by_key.get(_chain(ids, n)[-1])
        if entry is not None and entry.ids == tuple(ids[:n]):
            self._entries.move_to_end(entry.keys[-1])
            return 0
        return n

    def store(self, ids: list[int], kv: list[LayerKV]) -> None:
        """Keep ``kv`` (tensors of its own, ``wanted(ids)`` tokens each) as the prefix of ``ids``."""
        n = int(kv[0][0].shape[-2])
        if n % BLOCK or n > self.max_tokens:
            raise ValueError(f"a prefix of {n} tokens: not whole blocks of {BLOCK}, or over {self.max_tokens}")
        keys = _chain(ids, n)
        old = self._entries.pop(keys[-1], None)
        if old is not None:
            self._forget(old)
        while self._entries and self.tokens + n > self.max_tokens:
            self._forget(self._entries.popitem(last=False)[1])
        entry = _Entry(tuple(ids[:n]), kv, keys)
        self._entries[keys[-1]] = entry
        for key in keys:
            self._by_key[key] = entry  # the newest entry through a boundary answers for it
        self.tokens += n

    def _forget(self, entry: _Entry) -> None:
        self.tokens -= len(entry.ids)
        for key in entry.keys:
            if self._by_key.get(key) is entry:
                del self._by_key[key]
