"""Structured output through the engine on any device: validity and the cost of the grammar.

Runs the same concurrent load twice, with and without a JSON-schema constraint (xgrammar), and
reports tokens/s for each and how many constrained outputs parse and validate. With random
weights (--random-weights-from) the text is noise, so only the constraint makes it JSON.

    python -m bench.structured_check --random-weights-from CONFIG_DIR --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.models import load_model, synchronize
from tokenrelay.wire import SamplingParams
from worker.constraints import Grammars, GrammarSpec, output_vocab_size
from worker.engine import Engine

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
}


async def _load(
    engine: Engine, prompt: list[int], users: int, max_tokens: int, constraint: Any
) -> tuple[float, int, list[tuple[str, str | None]]]:
    async def one(i: int) -> tuple[str, str | None, int]:
        text, finish, count = "", None, 0
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens)
        async for outs in engine.generate(
            f"s{i}-{constraint is not None}",
            [prompt],
            n=1,
            params=params,
            max_tokens=[max_tokens],
            constraint=constraint,
        ):
            for o in outs:
                text, finish, count = text + o.text, o.finish_reason or finish, count + o.tokens
        return text, finish, count

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(users)))
    elapsed = time.perf_counter() - start
    return elapsed, sum(r[2] for r in results), [(r[0], r[1]) for r in results]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights-from", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    bm = load_model(args.model, random_weights_from=args.random_weights_from, device=args.device, dtype=args.dtype)
    engine = Engine(
        model=bm.model,
        tokenizer=bm.tokenizer,
        eos_token_ids=bm.eos_token_ids,
        max_batch_size=args.users,
        kv_cache_tokens=1 << 20,
    )
    engine.start()
    grammars = Grammars(bm.tokenizer, vocab_size=output_vocab_size(bm.model), stop_token_ids=bm.eos_token_ids)
    factory = grammars.factory(grammars.compile(GrammarSpec.of(SCHEMA, "response_format")))
    prompt = bm.tokenizer("Give me a city as JSON:")["input_ids"]
    report: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "users": args.users,
        "max_tokens": args.max_tokens,
    }
    try:
        asyncio.run(_load(engine, prompt, 2, 4, None))  # warm-up
        for name, constraint in (("plain", None), ("json_schema", factory)):
            synchronize(args.device)
            elapsed, tokens, outputs = asyncio.run(_load(engine, prompt, args.users, args.max_tokens, constraint))
            row: dict[str, Any] = {
                "seconds": round(elapsed, 3),
                "tokens": tokens,
                "tokens_per_s": round(tokens / elapsed, 1),
            }
            if constraint is not None:
                import jsonschema

                stopped = [t for t, f in outputs if f == "stop"]
                valid = 0
                for text in stopped:
                    try:
                        jsonschema.validate(json.loads(text), SCHEMA)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        pass
                row.update(finished=len(stopped), valid=valid, sample=stopped[:2])
            report[name] = row
            print(name, row, file=sys.stderr, flush=True)
    finally:
        engine.stop()
    report["grammar_cost"] = round(report["plain"]["tokens_per_s"] / report["json_schema"]["tokens_per_s"], 3)
    text = json.dumps(report, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
