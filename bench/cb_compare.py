"""Our engine vs transformers' own continuous batching (``generate_batch``), in one process.

The measurement behind docs/architecture.md's choice of batching mechanism: the same model, the
same B prompts, 64 greedy tokens each, submitted at once to each; tokens/s = B * 64 / wall time.

    python -m bench.cb_compare --model DIR --batch 8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

import torch

from bench.models import load_model
from bench.prompts import chat_messages, prompt_ids
from tokenrelay.wire import SamplingParams
from worker.engine import Engine


def _engine_run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    async def one(i: int) -> int:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        count = 0
        async for outs in engine.generate(f"cb-{i}", [prompts[i]], n=1, params=params, max_tokens=[max_tokens]):
            count += sum(o.tokens for o in outs)
        return count

    async def all_of() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    start = time.perf_counter()
    tokens = asyncio.run(all_of())
    return tokens / (time.perf_counter() - start)


def _transformers_run(model: Any, prompts: list[list[int]], max_tokens: int, eos: int) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    # Its own warm-up (and any one-time set-up) stays out of the timed call, as the engine's does.
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    model.generate_batch(inputs=prompts[:2], generation_config=warm, progress_bar=False)
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False, warmup=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in out.values())
    return tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", default="8,32")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    bm = load_model(args.model)
    report: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "points": []}
    for b in [int(x) for x in args.batch.split(",")]:
        prompts = [prompt_ids(bm.tokenizer, m) for m in chat_messages(b)]
        engine = Engine(model=bm.model, tokenizer=bm.tokenizer, eos_token_ids=bm.eos_token_ids, max_batch_size=b)
        engine.start()
        try:
            _engine_run(engine, prompts[:2], 4)  # warm-up
            ours = _engine_run(engine, prompts, args.max_tokens)
        finally:
            engine.stop()
        # No EOS can end a sequence early (an id outside the vocabulary), so both make max_tokens.
        theirs = _transformers_run(bm.model, prompts, args.max_tokens, eos=len(bm.tokenizer) + 7)
        point = {"batch": b, "engine_tok_s": round(ours, 1), "transformers_cb_tok_s": round(theirs, 1),
                 "ratio": round(ours / theirs, 2)}
        report["points"].append(point)
        print(point, flush=True)
    report["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    report["torch_threads"] = torch.get_num_threads()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
