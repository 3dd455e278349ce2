"""First tokens wave by wave: the overhead point's load on one ``tokenrelay up``, repeated.

Users whose answers have the same length send their next requests together, so a closed loop
arrives in waves, and the overhead point's TTFT is how fast the relay takes a wave in. Its
figure (p50/p99 of 128 requests, a fresh ``up`` each time) swings by ±5-10 ms between runs of
the same code on these machines. This runs that load (tiny random Llama, ``--users`` users x
``--requests-per-user`` requests of ``--max-tokens`` tokens) ``--reps`` times on one ``up`` and
prints each wave's fastest / median / slowest TTFT and each rep's p50 and p99, then their means:
for alternating A/B runs, where many reps average the noise out. ``cwd`` decides which code
``up`` runs; its variables (``TOKENRELAY_GATEWAY_PROCESSES=1``, ...) reach it.

    python -m bench.waves --reps 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import aio, peers
from bench.http1 import Connection
from bench.loadgen import _body, one_request, warm_up
from bench.prompts import chat_messages
from bench.stats import RequestRecord, percentile


async def one_rep(peer: peers.Peer, users: int, per_user: int, max_tokens: int) -> tuple[list[str], float, float]:
    """Each wave's TTFT spread (ms), and the rep's p50 and p99 (ms)."""
    prompts = chat_messages(16)
    conns = [Connection(peer.base_url, headers={"Authorization": "Bearer bench"}) for _ in range(users)]
    records: dict[tuple[int, int], RequestRecord] = {}

    async def user(u: int) -> None:
        for k in range(per_user):
            rec = records[(u, k)] = RequestRecord(start=time.perf_counter())
            body = _body(peer.model, prompts[(u + k * users) % len(prompts)], max_tokens, True, peer.extra_body)
            await one_request(conns[u], "/chat/completions", body, rec)
            if rec.error or rec.ttft is None:
                raise RuntimeError(f"user {u}, request {k}: {rec.error or 'no token'}")

    try:
        await asyncio.gather(*(user(u) for u in range(users)))
    finally:
        for conn in conns:
            conn.close()
    waves = []
    for k in range(per_user):
        ttft = sorted(1000 * (records[(u, k)].ttft or 0.0) for u in range(users))
        waves.append(f"{ttft[0]:.0f}/{ttft[len(ttft) // 2]:.0f}/{ttft[-1]:.0f}")
    every = [r.ttft for r in records.values() if r.ttft is not None]
    return waves, 1000 * (percentile(every, 50) or 0.0), 1000 * (percentile(every, 99) or 0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.waves", description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--requests-per-user", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=64, help="as bench.compare's")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.models import make_tiny_llama

    tiny = make_tiny_llama(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny-llama")
    peer = peers.start_tokenrelay(str(tiny), "tiny-llama", Path(tempfile.mkdtemp(prefix="bench-waves-")),
                                  max_batch_size=args.max_batch_size)

    async def run() -> None:
        await warm_up(peer.base_url, peer.model, args.max_tokens, peer.extra_body)
        p50s, p99s = [], []
        print("TTFT ms per wave, fastest/median/slowest; then the rep's p50 and p99", flush=True)
        for _ in range(args.reps):
            waves, p50, p99 = await one_rep(peer, args.users, args.requests_per_user, args.max_tokens)
            p50s.append(p50)
            p99s.append(p99)
            print(" | ".join(f"w{k}: {w}" for k, w in enumerate(waves)) + f" || p50 {p50:.1f} p99 {p99:.1f}",
                  flush=True)
            await asyncio.sleep(1.0)  # idle between reps, as between the overhead point's repeats
        print(f"mean of {args.reps} reps: p50 {statistics.mean(p50s):.1f} ms, p99 {statistics.mean(p99s):.1f} ms")

    try:
        aio.run(run())
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
