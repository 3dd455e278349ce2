"""Load generator: N simulated users send streaming chat requests to an OpenAI-compatible server.

Each user sends its requests back to back (the next one when the previous stream ends) until
it has sent ``requests_per_user`` or the optional ``duration_s`` has passed (requests already
started then still finish). Metrics follow ``bench.stats``. Output tokens come from the usage
chunk (``stream_options.include_usage``) when the server sends one, else one per content chunk.
A stream that ends without ``data: [DONE]`` (transformers serve) is not an error. Each user keeps
one HTTP/1.1 connection (``bench.http1``: lines are read in the socket's callback, so the client
costs little CPU beside the servers it measures, and a line's time is when its bytes arrived).

    python -m bench.loadgen --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct \\
        --users 1,4,8 --requests-per-user 2 --max-tokens 64 --extra-body '{"ignore_eos": true}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench import aio
from bench.http1 import Connection
from bench.prompts import chat_messages
from bench.schedule import add_requests_per_user, users_list
from bench.stats import RequestRecord, Result, print_json, summarize


def _body(
    model: str, messages: list[dict[str, Any]], max_tokens: int, usage: bool, extra_body: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    body.update(extra_body)
    return body


def _content(chunk: dict[str, Any]) -> tuple[str, int | None]:
    """(new text, completion_tokens from a usage chunk or None)."""
    if chunk.get("error"):
        err = chunk["error"]
        raise RuntimeError(f"error in stream: {err.get('message', err) if isinstance(err, dict) else err}")
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text += delta.get("content") or ""
    usage = chunk.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return text, tokens


async def one_request(
    conn: Connection, path: str, body: dict[str, Any], rec: RequestRecord | None = None, timeout_s: float = 600.0
) -> RequestRecord:
    """Send one streaming request; ``rec`` (filled as lines arrive) lets a caller that cancels
    this coroutine keep what it had measured."""
    rec = rec or RequestRecord(start=time.perf_counter())
    rec.start = time.perf_counter()
    chunks = 0
    usage_tokens: int | None = None
    last: float | None = None
    ended = False

    def on_line(line: bytes) -> None:
        nonlocal chunks, usage_tokens, last, ended
        if ended or not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data.startswith(b"[DONE]"):
            ended = True
            return
        text, tokens = _content(json.loads(data))
        if tokens is not None:
            usage_tokens = tokens
        if text:
            now = time.perf_counter()
            chunks += 1
            rec.output_tokens = chunks
            if last is None:
                rec.ttft = now - rec.start
            else:
                rec.itl.append(now - last)
            last = now

    try:
        status, error_body = await asyncio.wait_for(conn.post_json(path, body, on_line), timeout_s)
        if status != 200:
            rec.error = f"HTTP {status}: {error_body.decode(errors='replace')[:200]}"
            return rec
        rec.e2e = time.perf_counter() - rec.start
        rec.output_tokens = usage_tokens if usage_tokens is not None else chunks
        if rec.output_tokens == 0:
            rec.error = "no output tokens"
    except Exception as exc:  # every failure is a data point, never a crash of the run
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
        rec.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return rec


async def run_load(
    base_url: str,
    model: str,
    users: int,
    requests_per_user: int,
    max_tokens: int,
    prompts: list[list[dict[str, Any]]] | None = None,
    extra_body: dict[str, Any] | None = None,
    *,
    duration_s: float | None = None,
    usage: bool = True,
    system: str = "http",
    timeout_s: float = 600.0,
    hard_cap_s: float | None = None,
) -> Result:
    """Run one load point and summarize it. ``prompts`` are chat message lists, cycled over users.

    ``duration_s``: no request starts after it. ``hard_cap_s``: requests still running then are
    cut (errors "cut at the hard cap"; the tokens they had produced still count).
    """
    prompts = prompts or chat_messages(16)
    headers = {"Authorization": "Bearer bench"}
    records: list[RequestRecord] = []
    conns = [Connection(base_url, headers=headers) for _ in range(users)]  # one per user, kept alive
    start = time.perf_counter()
    deadline = start + duration_s if duration_s else None

    async def user(u: int) -> None:
        for k in range(requests_per_user):
            if deadline is not None and time.perf_counter() >= deadline:
                return
            messages = prompts[(u + k * users) % len(prompts)]
            rec = RequestRecord(start=time.perf_counter())
            records.append(rec)
            body = _body(model, messages, max_tokens, usage, extra_body or {})
            await one_request(conns[u], "/chat/completions", body, rec, timeout_s)

    try:
        tasks = [asyncio.ensure_future(user(u)) for u in range(users)]
        _, pending = await asyncio.wait(tasks, timeout=hard_cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    finally:
        for conn in conns:
            conn.close()
    cut = [r for r in records if r.e2e is None and r.error is None]
    for r in cut:
        r.error = f"cut at the hard cap ({hard_cap_s:g} s)"
    notes = []
    if len(records) < users * requests_per_user:
        notes.append(f"caps: {len(records)} of {users * requests_per_user} requests started")
    if cut:
        notes.append(f"hard cap: {len(cut)} requests cut after {hard_cap_s:g} s")
    return summarize(system, users, records, wall, note="; ".join(notes))


async def warm_up(
    base_url: str, model: str, max_tokens: int, extra_body: dict[str, Any] | None = None, usage: bool = True
) -> Result:
    """Unmeasured: one full-length request, then 4 concurrent short ones (first-request work, batching)."""
    first = await run_load(base_url, model, 1, 1, max_tokens, None, extra_body, usage=usage, system="warmup")
    if first.errors:
        return first
    return await run_load(base_url, model, 4, 1, min(16, max_tokens), None, extra_body, usage=usage, system="warmup")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--users", type=users_list, default=[1], help="comma-separated concurrency levels")
    add_requests_per_user(p, "2")
    p.add_argument("--duration", type=float, default=None, help="stop starting requests after this many seconds")
    p.add_argument("--hard-cap", type=float, default=None, help="cut requests still running after this many s")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help='JSON merged into each body, e.g. \'{"ignore_eos": true, "min_tokens": 64}\'',
    )
    p.add_argument("--no-usage", action="store_true", help="don't send stream_options.include_usage")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    p.add_argument("--system", default="http", help="label in the output")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here too")
    args = p.parse_args(argv)

    async def go() -> list[Result]:
        for _ in range(args.warmup):
            await warm_up(args.base_url, args.model, args.max_tokens, args.extra_body, not args.no_usage)
        out = []
        for users in args.users:
            res = await run_load(
                args.base_url,
                args.model,
                users,
                args.requests_per_user(users),
                args.max_tokens,
                None,
                args.extra_body,
                duration_s=args.duration,
                hard_cap_s=args.hard_cap,
                usage=not args.no_usage,
                system=args.system,
            )
            print(
                f"users={users}: {res.tok_s} tok/s, TTFT p50 {res.ttft_ms['p50']} ms, errors {res.errors}",
                file=sys.stderr,
            )
            out.append(res)
        return out

    print_json([r.to_dict() for r in aio.run(go())], args.json_out)


if __name__ == "__main__":
    main()
