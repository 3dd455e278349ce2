"""The engine alone: continuous batching gives exactly what ``generate`` gives, request by request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from typing import Any

import pytest
import torch

from tests.models import make_tiny_llama
from tokenrelay.wire import SamplingParams
from worker.engine import THREAD_NAME, Engine


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-engine"), seed=1)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _prompts(tok: Any) -> list[list[int]]:
    texts = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3, "café 東京", "Numbers: 1 2 3"]
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("max_batch_size,kv_tokens", [(8, 100_000), (2, 100_000), (8, 120)])
def test_batched_text_equals_generate(loaded: tuple[Any, Any], max_batch_size: int, kv_tokens: int) -> None:
    """Staggered joins, a batch too small for all (queueing), and a KV budget that forces preemption."""
    model, tok = loaded
    prompts = _prompts(tok)
    max_tokens = [30, 12, 25, 18]
    expected = []
    for p, m in zip(prompts, max_tokens, strict=True):
        out = model.generate(torch.tensor([p]), max_new_tokens=m, min_new_tokens=m, do_sample=False)
        # A trailing incomplete UTF-8 sequence is held back by the engine, never sent as U+FFFD.
        expected.append(tok.decode(out[0][len(p):], skip_special_tokens=True).rstrip("\ufffd"))
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=max_batch_size,
                    kv_cache_tokens=kv_tokens)
    engine.start()

    async def texts() -> list[str]:
        async def one(i: int) -> str:
            await asyncio.sleep(0.01 * i)
            text = ""
            async for outs in engine.generate(f"r{i}", [prompts[i]], n=1, max_tokens=[max_tokens[i]],
                                              params=SamplingParams(temperature=0, ignore_eos=True)):
                text += "".join(o.text for o in outs)
            return text

        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    try:
        assert asyncio.run(texts()) == expected
        if sys.platform.startswith("linux"):  # named for top -H and bench/cpu_cost.py
            with open(f"/proc/self/task/{engine._thread.native_id}/comm") as comm:
                assert comm.read().strip() == THREAD_NAME
    finally:
        engine.stop()


def test_holes_are_filled_in_place_and_compacted(loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that end become holes; a waiting request no longer than the batch fills one in
    place, a longer one joins by concatenation, and the batch is compacted when it would pass
    ``max_batch_size`` rows: every text stays exactly what ``generate`` gives."""
    from worker import kvbatch

    model, tok = loaded
    calls = {"fill": 0, "retire": 0, "select": 0, "extend": 0}
    for name in calls:
        original = getattr(kvbatch.KVBatch, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(kvbatch.KVBatch, name, counted)
    short = tok("Hi")["input_ids"]
    long = tok("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"]
    # Four rows run; the fifth request waits for the first hole (its prompt fits), the sixth for
    # the next one (its prompt is longer than the batch by then).
    plan = [(short, 6), (tok("Numbers: 1 2 3")["input_ids"], 40), (tok("café")["input_ids"], 40),
            (tok("Hello")["input_ids"], 40), (short, 6), (long, 10)]
    # Each token and its logprob, as a plain forward over that sequence alone gives them: a row
    # that read another's columns, or its own at the wrong positions, would differ here.
    expected = []
    for prompt, m in plan:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=m, min_new_tokens=m, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        ids = out.sequences[0][len(prompt):].tolist()
        expected.append([(t, float(torch.log_softmax(lg[0], -1)[t])) for t, lg in zip(ids, out.logits, strict=True)])
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=4)
    forward = engine._forward

    def slow_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(0.005)  # steps long enough that all six requests are in before the first ends
        return forward(*args, **kwargs)

    engine._forward = slow_forward  # type: ignore[method-assign]
    engine.start()

    async def tokens() -> list[list[tuple[int, float]]]:
        async def one(i: int) -> list[tuple[int, float]]:
            prompt, m = plan[i]
            await asyncio.sleep(0.001 * i)  # in this order
            got = []
            async for outs in engine.generate(f"r{i}", [prompt], n=1, max_tokens=[m],
                                              params=SamplingParams(temperature=0, ignore_eos=True, logprobs=0)):
                got += [(lp.token_id, lp.logprob) for o in outs for lp in o.logprobs]
            return got

        return list(await asyncio.gather(*(one(i) for i in range(len(plan)))))

    try:
        got = asyncio.run(asyncio.wait_for(tokens(), 60))
    finally:
        engine.stop()
    for mine, theirs in zip(got, expected, strict=True):
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        assert [lp for _, lp in mine] == pytest.approx([lp for _, lp in theirs], abs=1e-4)
    # The batch is never longer than its longest prompt plus 40 steps (the 40-token rows).
    assert len(long) > max(len(p) for p, _ in plan[:5]) + 41
    assert calls["fill"] >= 1 and calls["extend"] >= 1 and calls["select"] >= 1 and calls["retire"] >= 2, calls


def _greedy(model: Any, prompt: list[int], m: int) -> list[tuple[int, float]]:
    """Each token of a greedy continuation and its logprob, from ``generate`` on the prompt alone."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=m, min_new_tokens=m, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0][len(prompt):].tolist()
    return [(t, float(torch.log_softmax(lg[0], -1)[t])) for t, lg in zip(ids, out.logits, strict=True)]


@pytest.mark.parametrize("own_mask", [True, False], ids=["engine-mask", "transformers-mask"])
def test_cached_prefixes_give_what_a_plain_forward_gives(loaded: tuple[Any, Any], own_mask: bool) -> None:
    """A prefill that starts from cached prefixes: rows whose prefix is cut to the batch's,
    a row with none (zeros, then padding up to its tokens), and prompt logprobs, which need
    every position and so never start from the cache. Every token and logprob as ``generate``,
    with the engine's 4-D mask and with the 2-D one transformers expands (as on a GPU)."""
    model, tok = loaded
    x = tok(" ".join(["The quick brown fox jumps over the lazy dog."] * 6))["input_ids"]
    assert len(x) >= 50
    a = x[:50]  # cached first: its first 48 tokens (three blocks)
    b = x[:40] + x[5:10]  # 45 tokens: 32 of them cached (the last block must leave one to compute)
    c = x[:50] + x[1:4]  # 48 cached, cut to the batch's 32
    d = tok("café 東京")["input_ids"]  # nothing cached
    assert len(d) < 16
    e = x[:16] + d  # one block cached: zeros, then it, right-aligned in the batch's 32
    wave = [b, c, d, a, e]
    m = 6
    expected = {tuple(p): _greedy(model, p, m) for p in [a, *wave]}
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, prefix_cache_tokens=256)
    assert engine._mask_4d
    engine._mask_4d = own_mask
    engine.start()
    params = SamplingParams(temperature=0, ignore_eos=True, logprobs=0)

    async def run(request_id: str, prompts: list[list[int]], n: int, echo: bool = False) -> dict[int, list[Any]]:
        got: dict[int, list[Any]] = {}
        async for outs in engine.generate(request_id, prompts, n=n, max_tokens=[m] * len(prompts), params=params,
                                          prompt_logprobs=echo):
            for o in outs:
                got.setdefault(o.index, []).append(o)
        return got

    try:
        first = asyncio.run(run("a", [a], 1))
        assert engine.prefixes is not None and engine.prefixes.tokens == 48 and engine.prefixes.hit_tokens == 0
        # One request, so one prefill: b, c and a start from 32 cached tokens, e from 16, d from none.
        together = asyncio.run(run("wave", wave, 2))
        assert engine.prefixes.hit_tokens == 3 * 32 + 16
        echoed = asyncio.run(run("echo", [a], 1, echo=True))
        assert engine.prefixes.hit_tokens == 3 * 32 + 16
    finally:
        engine.stop()

    def tokens(outs: list[Any]) -> list[tuple[int, float]]:
        return [(lp.token_id, lp.logprob) for o in outs for lp in o.logprobs]

    runs = [(first, [a], 1), (together, wave, 2), (echoed, [a], 1)]
    for got, prompts, n in runs:
        assert sorted(got) == list(range(len(prompts) * n))
        for index, outs in got.items():
            want = expected[tuple(prompts[index // n])]
            assert [t for t, _ in tokens(outs)] == [t for t, _ in want]
            assert [lp for _, lp in tokens(outs)] == pytest.approx([lp for _, lp in want], abs=1e-4)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([a])).logits[0].float(), -1)
    prompt_lps = echoed[0][0].prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(a)
    assert [lp.logprob for lp in prompt_lps[1:] if lp] == pytest.approx(
        [float(full[j, a[j + 1]]) for j in range(len(a) - 1)], abs=1e-4)


def test_cancel_frees_the_row(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=1)
    engine.start()

    async def scenario() -> int:
        long = engine.generate("long", [[1, 2, 3]], n=1, max_tokens=[100_000],
                               params=SamplingParams(temperature=0, ignore_eos=True))
        await long.__anext__()
        await long.aclose()  # leaving early cancels
        count = 0
        async for outs in engine.generate("next", [[1, 2, 3]], n=1, max_tokens=[5],
                                          params=SamplingParams(temperature=0, ignore_eos=True)):
            count += sum(o.tokens for o in outs)
        return count

    try:
        # With one row, the second request can only run if the first one's row was freed.
        assert asyncio.run(asyncio.wait_for(scenario(), 30)) == 5
    finally:
        engine.stop()


def test_arrivals_during_a_prefill_join_before_the_next_decode(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that arrives while another is being prefilled is prefilled next, not after a
    decode step of the batch: in a wave of arrivals each such step delayed every later one."""
    model, tok = loaded
    steps: list[str] = []
    first_prefill_started, second_submitted = threading.Event(), threading.Event()
    prefill, decode = Engine._prefill, Engine._decode

    def traced_prefill(self: Engine, seqs: list[Any]) -> None:
        steps.append("prefill " + ",".join(s.request.request_id for s in seqs))
        if len(steps) == 1:
            first_prefill_started.set()
            assert second_submitted.wait(10)
        prefill(self, seqs)

    def traced_decode(self: Engine) -> None:
        steps.append("decode")
        decode(self)

    monkeypatch.setattr(Engine, "_prefill", traced_prefill)
    monkeypatch.setattr(Engine, "_decode", traced_decode)
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=4)
    engine.start()
    params = SamplingParams(temperature=0, ignore_eos=True)

    async def tokens(request_id: str) -> int:
        return sum([o.tokens async for outs in engine.generate(request_id, [[1, 2, 3]], n=1, max_tokens=[3],
                                                               params=params) for o in outs])

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(tokens("a"))
        assert await asyncio.to_thread(first_prefill_started.wait, 10)
        second = asyncio.ensure_future(tokens("b"))
        await asyncio.sleep(0)  # generate() hands "b" to the engine at its first step
        second_submitted.set()
        return list(await asyncio.gather(first, second))

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [3, 3]
    finally:
        engine.stop()
    assert steps[:3] == ["prefill a", "prefill b", "decode"]


def _traced_prefills(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The request ids of each prefill pass, in order."""
    passes: list[list[str]] = []
    prefill = Engine._prefill

    def traced(self: Engine, seqs: list[Any]) -> None:
        passes.append([s.request.request_id for s in seqs])
        prefill(self, seqs)

    monkeypatch.setattr(Engine, "_prefill", traced)
    return passes


async def _tokens(engine: Engine, request_id: str, max_tokens: int = 2) -> int:
    params = SamplingParams(temperature=0, ignore_eos=True)
    return sum([o.tokens async for outs in engine.generate(request_id, [[1, 2, 3]], n=1, max_tokens=[max_tokens],
                                                           params=params) for o in outs])


def test_after_concurrent_load_an_idle_engine_prefills_a_burst_in_one_pass(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that reach an idle engine a little apart, after it ran several at once, share
    one prefill: the relay hands a wave over one request at a time."""
    model, tok = loaded
    passes = _traced_prefills(monkeypatch)
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=4, batch_wait=0.2)
    engine.start()

    async def scenario() -> list[int]:
        await asyncio.gather(_tokens(engine, "a"), _tokens(engine, "b"))  # two at once
        await asyncio.sleep(0.05)  # idle
        first = asyncio.ensure_future(_tokens(engine, "c"))
        await asyncio.sleep(0.05)  # under batch_wait: "c" is still waiting
        return list(await asyncio.gather(first, _tokens(engine, "d")))

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [2, 2]
    finally:
        engine.stop()
    assert sorted(map(sorted, passes)) == [["a", "b"], ["c", "d"]]


def test_a_burst_that_fills_the_batch_is_prefilled_without_waiting(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = loaded
    passes = _traced_prefills(monkeypatch)
    # A wait this long would show below; two rows leave no room for a third.
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=2, batch_wait=5.0)
    engine.start()

    async def scenario() -> float:
        await asyncio.gather(_tokens(engine, "a"), _tokens(engine, "b"))
        await asyncio.sleep(0.02)  # idle
        start = time.monotonic()
        await asyncio.gather(_tokens(engine, "c"), _tokens(engine, "d"))
        return time.monotonic() - start

    try:
        took = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()
    assert sorted(map(sorted, passes)) == [["a", "b"], ["c", "d"]]
    assert took < 2.5, took


def test_a_burst_as_large_as_the_spell_before_is_prefilled_without_waiting(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a closed loop the users whose answers ended together come back together: once as
    many wait as ran at once before, no quiet spell is waited for."""
    model, tok = loaded
    passes = _traced_prefills(monkeypatch)
    # A wait this long would show below; the batch has room for more than the burst.
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=8, batch_wait=5.0)
    engine.start()

    async def scenario() -> float:
        await asyncio.gather(_tokens(engine, "a"), _tokens(engine, "b"), _tokens(engine, "c"))
        await asyncio.sleep(0.02)  # idle
        start = time.monotonic()
        await asyncio.gather(_tokens(engine, "d"), _tokens(engine, "e"), _tokens(engine, "f"))
        return time.monotonic() - start

    try:
        took = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()
    assert sorted(map(sorted, passes)) == [["a", "b", "c"], ["d", "e", "f"]]
    assert took < 2.5, took


def test_an_engine_that_ran_one_request_at_a_time_does_not_wait(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = loaded
    passes = _traced_prefills(monkeypatch)
    # A wait this long would show in every request below.
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, batch_wait=5.0)
    engine.start()

    async def scenario() -> list[float]:
        took = []
        for request_id in ("a", "b", "c"):
            start = time.monotonic()
            assert await _tokens(engine, request_id) == 2
            took.append(time.monotonic() - start)
            await asyncio.sleep(0.02)  # idle between them
        return took

    try:
        took = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()
    assert passes == [["a"], ["b"], ["c"]]
    assert max(took) < 2.5, took


def test_mixed_settings_share_a_batch(loaded: tuple[Any, Any]) -> None:
    """Greedy, seeded sampling and a stop string in one batch, each honoured."""
    model, tok = loaded
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=8)
    engine.start()
    prompt = tok("Hello world")["input_ids"]

    async def one(params: SamplingParams, rid: str) -> tuple[str, str | None]:
        text, finish = "", None
        async for outs in engine.generate(rid, [prompt], n=1, max_tokens=[20], params=params):
            for o in outs:
                text += o.text
                finish = o.finish_reason or finish
        return text, finish

    async def scenario() -> list[tuple[str, str | None]]:
        return list(await asyncio.gather(
            one(SamplingParams(temperature=0, ignore_eos=True), "greedy"),
            one(SamplingParams(temperature=1.0, seed=7, ignore_eos=True), "seeded-a"),
            one(SamplingParams(temperature=1.0, seed=7, ignore_eos=True, top_k=5), "seeded-topk"),
        ))

    try:
        greedy, seeded, _ = asyncio.run(scenario())
        stop = greedy[0][5:8]
        again = asyncio.run(one(SamplingParams(temperature=0, ignore_eos=True, stop=[stop]), "stopped"))
        seeded_alone = asyncio.run(one(SamplingParams(temperature=1.0, seed=7, ignore_eos=True), "seeded-b"))
    finally:
        engine.stop()
    assert greedy[1] == "length" and seeded[1] == "length"
    assert again == (greedy[0][: greedy[0].find(stop)], "stop")
    assert seeded_alone == seeded


def test_prompt_logprobs_match_a_plain_forward(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    prompt = tok("The quick brown fox")["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id})
    engine.start()

    async def first_output() -> Any:
        async for outs in engine.generate("p", [prompt, [7, *prompt]], n=2, max_tokens=[2, 2], prompt_logprobs=True,
                                          params=SamplingParams(temperature=0, logprobs=2, ignore_eos=True)):
            return outs

    try:
        outs = asyncio.run(first_output())
    finally:
        engine.stop()
    assert sorted(o.index for o in outs) == [0, 1, 2, 3]
    first = next(o for o in outs if o.index == 0)
    assert first.prompt_logprobs is not None and first.prompt_logprobs[0] is None
    got = first.prompt_logprobs[1:]
    assert [lp.token_id for lp in got if lp] == prompt[1:]
    for j, lp in enumerate(got):
        assert lp is not None
        assert lp.logprob == pytest.approx(float(expected[j, prompt[j + 1]]), abs=1e-4)
        assert lp.top[0][0] == int(expected[j].argmax())
    other = next(o for o in outs if o.index == 2)
    assert other.prompt_logprobs is not None and len(other.prompt_logprobs) == len(prompt) + 1


def test_submit_gives_what_generate_gives_and_ends_on_a_failing_callback(loaded: tuple[Any, Any]) -> None:
    """The callback form the worker uses: same text, the end as a future; a callback that raises
    ends its request with that error and frees its row, as does cancelling the future."""
    model, tok = loaded
    prompt = tok("The quick brown fox")["input_ids"]
    params = SamplingParams(temperature=0, ignore_eos=True)
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=1)
    engine.start()

    async def scenario() -> None:
        expected = ""
        async for outs in engine.generate("g", [prompt], n=1, max_tokens=[20], params=params):
            expected += "".join(o.text for o in outs)
        pieces: list[str] = []
        tokens = 0

        def collect(outs: list[Any]) -> None:
            nonlocal tokens
            pieces.extend(o.text for o in outs)
            tokens += sum(o.tokens for o in outs)

        await engine.submit("s", [prompt], n=1, max_tokens=[20], params=params, on_outputs=collect)
        assert "".join(pieces) == expected and tokens == 20

        def fail(outs: list[Any]) -> None:
            raise ValueError("the caller's bug")

        with pytest.raises(ValueError, match="the caller's bug"):
            await engine.submit("bad", [prompt], n=1, max_tokens=[100_000], params=params, on_outputs=fail)
        first = asyncio.Event()
        long = engine.submit("long", [prompt], n=1, max_tokens=[100_000], params=params,
                             on_outputs=lambda outs: first.set())
        await first.wait()
        long.cancel()
        # One row: this only runs once the failed and the cancelled request have left it.
        pieces.clear()
        tokens = 0
        await engine.submit("after", [prompt], n=1, max_tokens=[5], params=params, on_outputs=collect)
        assert tokens == 5

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()


def test_packed_linears_follow_the_row_count(tmp_path: Any) -> None:
    """The engine tells the packed linears its row count each step; they move to the plain layout
    for one row and back for many, a layer per step here, while the text stays greedy's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.cpu_kernels import layouts_of, use_onednn_linears

    path = make_tiny_llama(tmp_path / "tiny", seed=1)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompt = _prompts(tok)[1]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    expected = tok.decode(out[0][len(prompt):], skip_special_tokens=True).rstrip("\ufffd")
    assert use_onednn_linears(model) > 0
    layouts = layouts_of(model)
    assert layouts is not None
    layouts.small_rows_dense, layouts.DWELL_S, layouts.STEP_BUDGET_S = True, 0.0, 0.0
    owned = layouts.owned
    assert len(owned) < 30 and all(m.weight.is_mkldnn for m in owned)
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, max_batch_size=4)
    engine.start()

    async def text(i: int, max_tokens: int) -> str:
        parts = []
        async for outs in engine.generate(f"r{i}", [prompt], n=1, max_tokens=[max_tokens],
                                          params=SamplingParams(temperature=0, ignore_eos=True)):
            parts.extend(o.text for o in outs)
        return "".join(parts)

    async def many() -> list[str]:
        return list(await asyncio.gather(*(text(i, 40) for i in range(1, 5))))

    try:
        assert asyncio.run(text(0, 40)) == expected
        assert not layouts.packed and not any(m.weight.is_mkldnn for m in owned)
        assert asyncio.run(many()) == [expected] * 4
        assert layouts.packed and all(m.weight.is_mkldnn for m in owned)
    finally:
        engine.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is per thread on Linux only")
def test_engine_threads_run_at_the_lower_priority(loaded: tuple[Any, Any]) -> None:
    """The engine thread and the OpenMP workers it starts run ``nice`` lower; this thread does not."""
    model, tok = loaded
    engine = Engine(model=model, tokenizer=tok, eos_token_ids={tok.eos_token_id}, nice=3)
    engine.start()
    here = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, here)

    def nice_of_threads() -> dict[int, int]:
        out = {}
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread may end while we look
                out[int(task)] = os.getpriority(os.PRIO_PROCESS, int(task))
        return out

    seen: list[dict[int, int]] = []

    async def scenario() -> None:
        async for _ in engine.generate("r", [[1, 2, 3]], n=1, max_tokens=[8],
                                       params=SamplingParams(temperature=0, ignore_eos=True)):
            seen.append(nice_of_threads())  # mid-generation: the OpenMP team is up

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        engine.stop()
    lowered = {tid for snapshot in seen for tid, nice in snapshot.items() if nice == min(19, base + 3)}
    assert engine._thread.native_id in lowered
    # torch's OpenMP team: the engine thread and num_threads - 1 workers cloned from it.
    assert max(len({t for t, n in s.items() if n == min(19, base + 3)}) for s in seen) >= torch.get_num_threads()
    assert os.getpriority(os.PRIO_PROCESS, here) == base
