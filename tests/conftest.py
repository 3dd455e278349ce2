"""Session fixtures: a real Redis (REDIS_URL or a private redis-server), log folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.procs import redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (4096-token context) with a byte-level BPE tokenizer and chat template."""
    from tests.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", context=4096)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture()
def client(stack: str) -> openai.OpenAI:
    """The official SDK, no retries, on the module's ``stack`` fixture (its gateway's base URL)."""
    return openai.OpenAI(base_url=stack + "/v1", api_key="x", max_retries=0, timeout=60)
