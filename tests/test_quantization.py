"""bitsandbytes 8-bit and 4-bit through the real loading path and the same engine (slow on CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.models import make_tiny_llama
from tokenrelay import config
from tokenrelay.wire import SamplingParams
from worker.engine import Engine
from worker.loading import load
from worker.settings import OPTIONS, WorkerSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-q"))


@pytest.mark.parametrize("mode,layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_worker_generates(tiny: Path, mode: str, layer: str) -> None:
    pytest.importorskip("bitsandbytes")
    settings = WorkerSettings.from_values(
        config.resolve(OPTIONS, {"model": str(tiny), "quantization": mode, "device_map": "cpu"}, {}))
    loaded = load(settings)
    assert type(loaded.model.model.layers[0].mlp.down_proj).__name__ == layer
    engine = Engine(model=loaded.model, tokenizer=loaded.tokenizer, eos_token_ids=loaded.eos_token_ids)
    engine.start()

    async def run() -> tuple[int, str | None]:
        count, finish = 0, None
        async for outs in engine.generate("q", [[1, 2, 3], [4, 5]], n=2, max_tokens=[6, 6],
                                          params=SamplingParams(temperature=0, ignore_eos=True)):
            for o in outs:
                count += o.tokens
                finish = o.finish_reason or finish
        return count, finish

    try:
        assert asyncio.run(run()) == (24, "length")
    finally:
        engine.stop()
