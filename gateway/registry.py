"""Which models are served right now, read from the workers' registry keys in Redis.

A model exists for the gateway exactly while at least one live worker announces it; a worker's
key expires ``wire.WORKER_TTL_S`` after its last heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway.errors import invalid_request, model_not_found
from tokenrelay import wire

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    workers: int
    # The largest over the model's workers: the gateway only refuses what no worker could take.
    context_length: int
    max_request_tokens: int
    created: int  # when its oldest live worker started, epoch seconds

    @property
    def token_limit(self) -> int:
        return min(self.context_length, self.max_request_tokens)


class Registry:
    """Live workers by model, cached for ``ttl`` seconds so a request costs no Redis scan."""

    def __init__(self, redis: Any, ttl: float = 0.5) -> None:
        self._redis = redis
        self._ttl = ttl
        self._models: dict[str, ModelInfo] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def models(self) -> dict[str, ModelInfo]:
        if time.monotonic() - self._read_at < self._ttl:
            return self._models
        async with self._lock:  # one scan serves every request waiting on it
            if time.monotonic() - self._read_at >= self._ttl:
                self._models = await self._scan()
                self._read_at = time.monotonic()
        return self._models

    async def get(self, model: str) -> ModelInfo:
        info = (await self.models()).get(model)
        if info is None:
            raise model_not_found(model)
        return info

    async def _scan(self) -> dict[str, ModelInfo]:
        keys = [key async for key in self._redis.scan_iter(match=wire.WORKER_KEY_PATTERN, count=1000)]
        values = await self._redis.mget(keys) if keys else []
        by_model: dict[str, list[wire.WorkerInfo]] = {}
        for key, value in zip(keys, values, strict=True):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                info = wire.WorkerInfo.from_json(value)
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable worker key %r: %s", key, exc)
                continue
            by_model.setdefault(info.model, []).append(info)
        return {
            model: ModelInfo(
                name=model,
                workers=len(infos),
                context_length=max(i.context_length for i in infos),
                max_request_tokens=max(i.max_request_tokens for i in infos),
                created=int(min(i.started_at for i in infos)),
            )
            for model, infos in by_model.items()
        }


def check_max_tokens(info: ModelInfo, max_tokens: int | None, param: str) -> None:
    """Refuse a budget no worker could meet even with an empty prompt.

    The exact prompt + max_tokens check needs the tokenizer, so the worker makes it.
    """
    if max_tokens is not None and max_tokens > info.token_limit:
        raise invalid_request(
            f"This model's maximum context length is {info.token_limit} tokens. However, you requested "
            f"{max_tokens} tokens for the completion alone. Please reduce '{param}'.",
            param,
            "context_length_exceeded",
        )
