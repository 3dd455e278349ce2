"""The baseline: plain ``model.generate`` over a static batch of B same-length chat prompts.

Greedy, ``max_new_tokens = min_new_tokens = N``, so every row makes exactly N tokens.
tok/s = B * N / time of the full call. TTFT = time of a separate ``max_new_tokens=1`` call (the
prefill plus one token). Every row finishes with the batch, so e2e is the full call's time for
all B requests, and ITL is (e2e - TTFT) / (N - 1).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.models import BenchModel, synchronize
from bench.prompts import chat_messages
from bench.stats import RequestRecord, Result, summarize


def _batch(bm: BenchModel, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    tok = bm.tokenizer
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chat_messages(batch_size)]
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def _generate(bm: BenchModel, inputs: dict[str, torch.Tensor], new_tokens: int, device: str) -> tuple[float, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": bm.tokenizer.pad_token_id,
        # Random weights can make any token; min_new_tokens only bans EOS, so end on EOS never.
        "eos_token_id": sorted(bm.eos_token_ids) or None,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = bm.model.generate(**inputs, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, out


def run_static_batch(bm: BenchModel, batch_size: int, max_tokens: int, device: str, warmup: bool = True) -> Result:
    inputs = _batch(bm, batch_size, device)
    width = int(inputs["input_ids"].shape[1])
    if warmup:
        _generate(bm, inputs, 2, device)
    ttft, _ = _generate(bm, inputs, 1, device)
    e2e, out = _generate(bm, inputs, max_tokens, device)
    made = int(out.shape[1]) - width
    itl = (e2e - ttft) / max(1, made - 1)
    records = [
        RequestRecord(start=0.0, ttft=ttft, e2e=e2e, itl=[itl] * max(0, made - 1), output_tokens=made)
        for _ in range(batch_size)
    ]
    note = f"prompt width {width} tokens; TTFT from a separate max_new_tokens=1 call"
    if made != max_tokens:
        note += f"; made {made} tokens, not {max_tokens}"
    return summarize("plain generate (static batch)", batch_size, records, e2e, note=note)
