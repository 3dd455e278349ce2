"""One tokenrelay stack for the conformance modules: a worker serving the tiny model as
``tiny-conf`` (its own name, so no other test module's requests reach it) and a gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conformance.support import MODEL, client_for
from tests.procs import serving


@pytest.fixture(scope="package")
def conf_stack(redis_url: str, log_dir: Path, tiny_model: Path) -> Iterator[str]:
    """The gateway's base URL (``http://127.0.0.1:PORT``), its worker holding the tiny model."""
    with serving(redis_url, log_dir, str(tiny_model), MODEL, "--max-batch-size", "16") as base:
        yield base


@pytest.fixture()
def client(conf_stack: str) -> openai.OpenAI:
    return client_for(conf_stack)


@pytest.fixture(scope="package")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)
