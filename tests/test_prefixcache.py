"""The prompt-prefix cache alone: blocks, the token left to compute, eviction, collisions."""

from __future__ import annotations

import pytest
import torch

from worker import prefixcache
from worker.prefixcache import BLOCK, PrefixCache


def _kv(ids: list[int], n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer keys and values whose every column holds its token id (so a view shows which)."""
    col = torch.tensor(ids[:n], dtype=torch.float32)[None, :, None].expand(3, n, 4).clone()
    return [(col + layer, -col - layer) for layer in range(layers)]


def _store(cache: PrefixCache, ids: list[int], have: int = 0) -> int:
    n = cache.wanted(ids, have)
    if n:
        cache.store(ids, _kv(ids, n))
    return n


def test_whole_blocks_are_kept_and_a_match_leaves_a_token_to_compute() -> None:
    cache = PrefixCache(max_tokens=1000)
    ids = list(range(100, 100 + 2 * BLOCK + 5))
    assert cache.match(ids) == (0, [])
    assert _store(cache, ids) == 2 * BLOCK
    assert _store(cache, ids) == 0  # held already
    n, kv = cache.match([*ids, 7, 8])
    assert n == 2 * BLOCK and len(kv) == 2
    assert kv[1][0][0, :, 0].tolist() == [float(t + 1) for t in ids[:n]]
    # Exactly two blocks long: the second block's last token must be computed, so one block.
    assert cache.match(ids[: 2 * BLOCK])[0] == BLOCK
    # Shares the first block only.
    other = ids[:BLOCK] + [1] * (BLOCK + 3)
    assert cache.match(other)[0] == BLOCK
    assert cache.match([1] * 40)[0] == 0
    # What a match covered is not stored again; a longer prompt through it is.
    assert cache.wanted(ids + [9] * 20, have=2 * BLOCK) == 3 * BLOCK


def test_least_recently_used_entries_go_first_by_tokens() -> None:
    cache = PrefixCache(max_tokens=3 * BLOCK)
    first, second, third = ([k] * (BLOCK + 1) for k in (1, 2, 3))
    for ids in (first, second, third):
        assert _store(cache, ids) == BLOCK
    assert cache.tokens == 3 * BLOCK
    assert cache.match(first)[0] == BLOCK  # used: now the newest
    _store(cache, [4] * (BLOCK + 1))
    assert cache.tokens == 3 * BLOCK
    assert cache.match(second)[0] == 0
    assert cache.match(first)[0] == BLOCK and cache.match(third)[0] == BLOCK
    assert cache.wanted([5] * (4 * BLOCK), have=0) == 0  # never fits
    with pytest.raises(ValueError):
        cache.store([5] * 40, _kv([5] * 40, BLOCK + 1))


def test_a_hash_collision_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefixcache, "_chain", lambda ids, tokens: [0] * (tokens // BLOCK))
    cache = PrefixCache(max_tokens=1000)
    _store(cache, [1] * (BLOCK + 1))
    assert cache.match([1] * (BLOCK + 1))[0] == BLOCK
    assert cache.match([2] * (BLOCK + 1)) == (0, [])
