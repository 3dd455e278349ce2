"""The loadgen workload in-process against ``worker.engine.Engine`` (no gateway, no queue), and
the plain ``model.generate`` static batch of the same size, on CPU or CUDA.

Every user submits its requests back to back (greedy, ``ignore_eos``, exactly N tokens each);
metrics as in ``bench.stats`` (TTFT = from submit to the first non-empty text).

    python -m bench.engine_bench --model DIR --users 1,4,8 --requests-per-user 2 --json out.json
    python -m bench.engine_bench --random-weights-from CONFIG_DIR --device cuda --dtype bfloat16 \\
        --users 1,16,64,128 --requests-per-user 4 --budget-seconds 170 --json out.json

``--budget-seconds`` bounds the whole run (model load included): a point that would start after
it is skipped, and users of a running point stop starting new requests once it has passed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import sys
import time
from typing import Any

import torch

from bench import aio
from bench.models import BenchModel, load_model
from bench.procinfo import ForeignCpu
from bench.prompts import chat_messages, prompt_ids
from bench.schedule import PerUsers, add_requests_per_user, users_list
from bench.static_batch import run_static_batch
from bench.stats import RequestRecord, Result, print_json, summarize
from tokenrelay.wire import SamplingParams
from worker.cpu_kernels import restore_linears, use_onednn_linears
from worker.engine import Engine
from worker.openmp import release_openmp_threads
from worker.settings import ENGINE_NICE, PREFIX_CACHE_TOKENS

_ids = itertools.count()


def make_engine(bm: BenchModel, max_batch_size: int, kv_cache_tokens: int, nice: int,
                prefix_cache_tokens: int = PREFIX_CACHE_TOKENS) -> Engine:
    # No batch wait (the worker's --batch-wait-ms): here a wave is submitted in one go, so a wait
    # could only add to the baseline's TTFT, and so hide part of the relay's overhead.
    engine = Engine(
        model=bm.model,
        tokenizer=bm.tokenizer,
        eos_token_ids=bm.eos_token_ids,
        max_batch_size=max_batch_size,
        kv_cache_tokens=kv_cache_tokens,
        prefix_cache_tokens=prefix_cache_tokens,
        nice=nice,
    )
    engine.start()
    return engine


async def _one(engine: Engine, ids: list[int], max_tokens: int) -> RequestRecord:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, min_tokens=max_tokens)
    rec = RequestRecord(start=time.perf_counter())
    last: float | None = None
    try:
        async for outputs in engine.generate(f"bench-{next(_ids)}", [ids], n=1, params=params, max_tokens=[max_tokens]):
            now = time.perf_counter()
            rec.output_tokens += sum(o.tokens for o in outputs)
            if any(o.text for o in outputs):
                if last is None:
                    rec.ttft = now - rec.start
                else:
                    rec.itl.append(now - last)
                last = now
        rec.e2e = time.perf_counter() - rec.start
    except Exception as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    return rec


async def run_engine_load(
    engine: Engine,
    prompts: list[list[int]],
    users: int,
    requests_per_user: int,
    max_tokens: int,
    deadline: float | None = None,
    system: str = "engine",
) -> Result:
    """``deadline`` (perf_counter seconds): no request starts after it."""
    records: list[RequestRecord] = []

    async def user(u: int) -> None:
        for k in range(requests_per_user):
            if deadline is not None and time.perf_counter() >= deadline:
                return
            records.append(await _one(engine, prompts[(u + k * users) % len(prompts)], max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(user(u) for u in range(users)))
    wall = time.perf_counter() - start
    capped = len(records) < users * requests_per_user
    return summarize(system, users, records, wall, note="budget/duration cap reached" if capped else "")


def engine_prompts(bm: BenchModel, count: int = 16) -> list[list[int]]:
    return [prompt_ids(bm.tokenizer, m) for m in chat_messages(count)]


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _line(r: Result) -> str:
    return (
        f"{r.system:32s} users={r.users:4d} {r.tok_s:9.1f} tok/s  TTFT p50 {r.ttft_ms['p50']} "
        f"p99 {r.ttft_ms['p99']} ms  ITL p50 {r.itl_ms['p50']} ms  errors {r.errors} {r.note}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="safetensors model folder (config, weights, tokenizer)")
    p.add_argument(
        "--random-weights-from",
        default=None,
        help="folder with config.json + tokenizer files: build the model with random weights",
    )
    p.add_argument("--users", type=users_list, default=[1, 16, 64, 128])
    add_requests_per_user(p, "2")
    p.add_argument("--duration", type=float, default=None, help="per point: no request starts after this many seconds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--max-batch-size", type=int, default=0, help="engine rows (0: the largest --users)")
    p.add_argument("--kv-cache-tokens", type=int, default=65536)
    p.add_argument(
        "--cpu-linear",
        choices=["onednn", "torch"],
        default="onednn",
        help="the engine's float32 CPU linears, as the worker's flag",
    )
    p.add_argument(
        "--engine-nice", type=int, default=ENGINE_NICE, help="the engine thread's nice increment, as the worker's flag"
    )
    p.add_argument("--prefix-cache-tokens", type=int, default=PREFIX_CACHE_TOKENS,
                   help="prompt-prefix cache, as the worker's flag (0: off)")
    p.add_argument(
        "--plain-cpu-linear",
        choices=["onednn", "torch"],
        default="torch",
        help="plain generate's: torch (stock, the baseline) or the engine's kernels (batching alone compared)",
    )
    p.add_argument("--no-plain-generate", action="store_true", help="skip the static-batch baseline")
    p.add_argument("--no-engine", action="store_true", help="only the static-batch baseline")
    p.add_argument("--budget-seconds", type=float, default=None, help="whole-run time limit (see above)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    if not args.model and not args.random_weights_from:
        p.error("give --model or --random-weights-from")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    budget_end = t0 + args.budget_seconds if args.budget_seconds else None
    bm = load_model(
        args.model,
        random_weights_from=args.random_weights_from,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
    )
    load_s = time.perf_counter() - t0
    print(
        f"loaded {bm.source} ({'random weights' if bm.random_weights else 'weights'}) in {load_s:.1f}s",
        file=sys.stderr,
    )
    prompts = engine_prompts(bm)
    engine = None if args.no_engine else make_engine(bm, args.max_batch_size or max(args.users), args.kv_cache_tokens,
                                                         args.engine_nice, args.prefix_cache_tokens)
    points: list[dict[str, Any]] = []
    skipped: list[str] = []

    async def run_points() -> None:
        if engine is not None:
            if args.cpu_linear == "onednn":
                use_onednn_linears(bm.model)
            release_openmp_threads()  # as Engine.start: the engine thread's team is the only one
            # As loadgen's warm-up: one full-length request, then 4 concurrent short ones.
            await run_engine_load(engine, prompts, 1, 1, args.max_tokens, system="warmup")
            await run_engine_load(engine, prompts, 4, 1, min(16, args.max_tokens), system="warmup")
        for users in args.users:
            point: dict[str, Any] = {"users": users}
            for name in ("engine", "plain_generate"):
                if (name == "engine" and engine is None) or (name == "plain_generate" and args.no_plain_generate):
                    continue
                if budget_end is not None and time.perf_counter() >= budget_end:
                    skipped.append(f"{name} users={users}: out of budget ({args.budget_seconds}s)")
                    print(f"SKIPPED {skipped[-1]}", file=sys.stderr)
                    continue
                load_before = round(os.getloadavg()[0], 2)
                foreign = ForeignCpu(lambda: [os.getpid()]).__enter__()
                if name == "engine":
                    assert engine is not None
                    if args.cpu_linear == "onednn":
                        use_onednn_linears(bm.model)
                    # The static batch ran on this thread: its OpenMP team would slow the engine's.
                    release_openmp_threads()
                    deadline = budget_end
                    if args.duration:
                        cap = time.perf_counter() + args.duration
                        deadline = cap if deadline is None else min(deadline, cap)
                    res = await run_engine_load(
                        engine,
                        prompts,
                        users,
                        args.requests_per_user(users),
                        args.max_tokens,
                        deadline=deadline,
                    )
                else:
                    restore_linears(bm.model)
                    if args.plain_cpu_linear == "onednn":
                        use_onednn_linears(bm.model)
                    res = run_static_batch(bm, users, args.max_tokens, args.device)
                foreign.__exit__(None, None, None)
                print(_line(res), file=sys.stderr, flush=True)
                point[name] = {**res.to_dict(), "load_before": load_before, "foreign_cpu_pct": foreign.percent}
            points.append(point)

    try:
        aio.run(run_points())
    finally:
        if engine is not None:
            engine.stop()
    report = {
        "config": {k: (str(v) if isinstance(v, PerUsers) else v) for k, v in vars(args).items() if k != "json_out"},
        "model": {
            "source": bm.source,
            "random_weights": bm.random_weights,
            "parameters": sum(p.numel() for p in bm.model.parameters()),
            "load_s": round(load_s, 2),
        },
        "machine": machine_info(args.device),
        "points": points,
        "skipped": skipped,
        "total_s": round(time.perf_counter() - t0, 2),
    }
    print_json(report, args.json_out)


if __name__ == "__main__":
    main()
