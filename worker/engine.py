"""The engine: one model, one thread, continuous (iteration-level) batching.

Every step, waiting sequences are prefilled together and join the running batch; then the
whole batch decodes one token; finished or cancelled sequences leave at once (their rows become
holes that the next arrivals fill in place; see worker/kvbatch.py). Each sequence
keeps its own sampling settings, stop strings and seed, so requests of any mix share a batch.
The engine knows nothing of HTTP, arq or Redis: callers iterate ``generate`` and read lists
of ``ChoiceOutput`` (one list per step in which the request made progress), or ``submit`` a
callback that the event loop calls with those lists, with no task switch per request per step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenrelay.wire import SamplingParams
from worker.cpu_kernels import fit_rows
from worker.detokenize import IncrementalDetokenizer, StopText
from worker.kvbatch import KVBatch, new_cache
from worker.openmp import release_openmp_threads
from worker.outputs import ChoiceOutput, merge
from worker.prefixcache import LayerKV, PrefixCache
from worker.sampling import Constraint, RowState, TokenLogprob, sample

log = logging.getLogger(__name__)

# The engine thread's name for the OS (15 characters at most); its OpenMP workers inherit it.
THREAD_NAME = "tokenrelay-eng"


class EngineError(RuntimeError):
    """The model step failed; every request in the batch at that moment gets this."""


_END = object()


OutputsCallback = Callable[[list[ChoiceOutput]], None]


@dataclass
class _Request:
    request_id: str
    loop: asyncio.AbstractEventLoop
    unfinished: int
    on_outputs: OutputsCallback
    finished: asyncio.Future[None]
    dead: bool = False  # its event loop is gone: nobody will read it
    pending: list[Any] = field(default_factory=list)  # lists of outputs, then _END or an exception

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, [(self, [item])])
        except RuntimeError:  # the loop was closed under us; drop the request, keep the engine
            self.dead = True


@dataclass
class _Sequence:
    request: _Request
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    detok: IncrementalDetokenizer
    stop: StopText
    generator: torch.Generator | None
    constraint: Constraint | None = None
    want_prompt_logprobs: bool = False
    prompt_logprobs: list[TokenLogprob | None] | None = None
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # of its prompt, from the prefix cache at its first prefill

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Engine:
    """Continuous batching over one Hugging Face causal LM.

    Keyword-only arguments:
      model: a loaded ``AutoModelForCausalLM`` (any dtype, device_map or bitsandbytes mode).
      tokenizer: its tokenizer (for detokenization and padding).
      eos_token_ids: tokens that end a sequence (``finish_reason="stop"``).
      max_batch_size: most sequences decoded at once; more wait inside the engine.
      kv_cache_tokens: budget of cached tokens, counted as rows x padded length; sequences
        that would exceed it wait, and the newest are preempted (recomputed later) if growth
        would pass it.
      prefix_cache_tokens: how many prompt tokens' KV to keep for prompts that start alike
        (worker/prefixcache.py), beside the budget above; 0: none.
      batch_wait: seconds an idle engine, handed work after a spell of concurrent load, waits
        for more before it prefills: until that long passes with nothing new, or the waiting
        sequences fill ``max_batch_size``, and at most ``GATHER_WAITS`` times that in all (like
        Triton's ``max_queue_delay``, but ended by a quiet spell). A burst that reaches it over a
        few milliseconds (users whose previous answers ended together, as the relay hands their
        requests over one by one) is then prefilled in one pass instead of a small one that the
        rest waits behind. The wait also ends once as many requests wait as ran at once in the
        spell before (those users are back). An engine that ran one request at a time never
        waits, so a lone user pays nothing (its ``n`` choices count as one). 0: never wait.
      nice: how much lower the engine thread and its OpenMP workers run than the process's other
        threads (a Linux nice increment, 0-19; ignored elsewhere). With the model's threads on
        every core, the threads that move requests and tokens (this process's event loop, and
        Redis and the gateway when they share the machine) otherwise wait for a time slice at
        each wake-up: a first token's path has a dozen of those (docs/benchmarks-notes.md).
    """

    HOLE_STEPS = 16  # steps a hole may wait for an arrival before the batch is compacted
    GATHER_WAITS = 5  # the longest an idle engine waits for a burst, in ``batch_wait``s

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_batch_size: int = 32,
        kv_cache_tokens: int = 65536,
        prefix_cache_tokens: int = 0,
        batch_wait: float = 0.0,
        nice: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.kv_cache_tokens = kv_cache_tokens
        self.batch_wait = batch_wait
        self.nice = nice
        self.prefixes = PrefixCache(max_tokens=prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids, default=0)
        self._pad_id = int(pad)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        # One entry per row of the batch; None is a hole (worker/kvbatch.py: KVBatch.retire).
        self._running: list[_Sequence | None] = []
        self._holes_since = 0  # self.steps when the first of the present holes appeared (_retire)
        self._batch: KVBatch | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._cache_kwarg = "cache" if "cache" in _forward_params(model) else "past_key_values"
        # On the CPU only: elsewhere SDPA may pick a kernel (flash) that a mask rules out, and
        # transformers passes none where no row is padded.
        self._mask_4d = self.device.type == "cpu" and _plain_sdpa(model.config)
        self.steps = 0
        # The most requests running at once since the engine was last idle, and in the busy
        # spell before that (``batch_wait``: more than one, and how many).
        self._peak_requests = 0
        self._last_peak = 0
        self._team_busy = False  # this thread has run model work since it last released its team

    # ---- the asyncio side --------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread. The calling thread (the one that loaded the model) gives up
        its OpenMP workers, so the engine's are the only team (worker/openmp.py)."""
        release_openmp_threads()
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    async def generate(
        self,
        request_id: str,
        prompts: list[list[int]],
        *,
        n: int,
        params: SamplingParams,
        max_tokens: list[int],
        constraint: Callable[[], Constraint] | None = None,
        prompt_logprobs: bool = False,
    ) -> AsyncIterator[list[ChoiceOutput]]:
        """Generate ``n`` choices per prompt; choice ``i`` of prompt ``p`` has index ``p * n + i``.

        ``max_tokens[p]`` is the resolved limit for prompt ``p``; ``constraint`` makes one
        constraint per choice (structured output); ``prompt_logprobs`` adds the prompt tokens'
        logprobs (``params.logprobs`` alternatives each) to each choice's first output.
        Leaving the iterator early cancels the request.
        """
        pieces: asyncio.Queue[Any] = asyncio.Queue()
        finished = self.submit(request_id, prompts, n=n, params=params, max_tokens=max_tokens,
                               on_outputs=pieces.put_nowait, constraint=constraint, prompt_logprobs=prompt_logprobs)
        # Queued after the last outputs: the callback runs before the future ends.
        finished.add_done_callback(lambda _: pieces.put_nowait(_END))
        try:
            ended = False
            while not ended:
                items = [await pieces.get()]
                # When the consumer fell behind the engine, what piled up goes out as one list:
                # fewer, larger events under load, one per token when there is time.
                while not pieces.empty():
                    items.append(pieces.get_nowait())
                outputs = [o for item in items if item is not _END for o in item]
                ended = _END in items
                if outputs:
                    yield merge(outputs)
            finished.result()  # the engine's error, if that is how it ended
        finally:
            # Leaving early cancels the request; an error nobody will read is marked as read.
            if not finished.cancel() and not finished.cancelled():
                finished.exception()

    def submit(
        self,
        request_id: str,
        prompts: list[list[int]],
        *,
        n: int,
        params: SamplingParams,
        max_tokens: list[int],
        on_outputs: OutputsCallback,
        constraint: Callable[[], Constraint] | None = None,
        prompt_logprobs: bool = False,
    ) -> asyncio.Future[None]:
        """``generate`` with a callback, for a caller that serves many requests on one loop.

        The event loop calls ``on_outputs`` with each request's outputs (what piled up since
        the last call merged, as ``generate`` yields them), all requests of a step in one pass.
        The future ends with the request, or with the engine's error, or with the callback's
        exception (the request is then cancelled). Cancelling the future cancels the request.
        """
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        request = _Request(request_id, loop, len(prompts) * n, on_outputs, finished)
        # Cancelled, or its callback failed: the engine must stop too (after its own end or
        # error, this cancel finds nothing to do).
        finished.add_done_callback(lambda f: self.cancel(request_id) if f.cancelled() or f.exception() else None)
        self._add(request, prompts, n, params, max_tokens, constraint, prompt_logprobs)
        return finished

    def _add(self, request: _Request, prompts: list[list[int]], n: int, params: SamplingParams,
             max_tokens: list[int], constraint: Callable[[], Constraint] | None, prompt_logprobs: bool) -> None:
        seqs = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                gen = None
                if params.seed is not None:
                    gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
                seqs.append(_Sequence(
                    request, p * n + i, list(prompt), params, max_tokens[p],
                    IncrementalDetokenizer(self.tokenizer, prompt), StopText(params.stop), gen,
                    constraint() if constraint is not None else None,
                    prompt_logprobs,
                ))
        self._inbox.put(("add", seqs))

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        # Before the first parallel region: OpenMP workers are cloned from this thread and
        # inherit its nice value (and are cloned anew after each idle moment).
        _lower_priority(self.nice)
        _name_thread(THREAD_NAME)
        with torch.inference_mode():
            while True:
                idle = not self._running and not self._waiting
                if idle and self._team_busy:
                    # Idle: let this thread's OpenMP workers go, so other torch work in the
                    # process (a benchmark's baseline) runs as the only team; they come back
                    # with the next step.
                    release_openmp_threads()
                    self._team_busy = False
                if idle and self._peak_requests:
                    self._last_peak, self._peak_requests = self._peak_requests, 0
                if not self._drain_inbox(block=idle):
                    break
                if idle and self._waiting and self._last_peak > 1 and self.batch_wait > 0 and not self._gather():
                    break
                dead = {s.request.request_id for s in self._live() if s.request.dead}
                if dead:
                    self._drop(dead)
                self._team_busy |= bool(self._running or self._waiting)
                try:
                    if self._admit() and not self._inbox.empty():
                        # What arrived during that prefill joins before the batch decodes: in a
                        # wave of arrivals it would wait a decode step more, on a busy machine
                        # several milliseconds (docs/benchmarks-notes.md).
                        if not self._drain_inbox(block=False):
                            break
                        self._admit()
                    if self._running:
                        self._decode()
                except Exception as exc:
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"generation failed: {exc}"))

    def _gather(self) -> bool:
        """Take in arrivals until ``batch_wait`` passes without one (see the class doc); False
        once told to stop."""
        deadline = time.monotonic() + self.batch_wait * self.GATHER_WAITS
        while (wait := min(self.batch_wait, deadline - time.monotonic())) > 0:
            if len(self._waiting) >= self.max_batch_size:
                break  # its rows are all spoken for: nothing more could join this prefill
            if len({id(s.request) for s in self._waiting}) >= self._last_peak:
                # As many as ran together in the spell before: users whose answers ended
                # together are back, and waiting for a quiet spell would only hold them
                # (2-3.5 ms a wave with both CPUs idle, docs/benchmarks-notes.md).
                break
            before = len(self._waiting)
            if not self._drain_inbox(block=True, timeout=wait):
                return False
            if len(self._waiting) <= before:
                break  # a quiet spell (or only cancels)
        return True

    def _drain_inbox(self, block: bool, timeout: float = 0.5) -> bool:
        """Handle what the inbox holds, first waiting up to ``timeout`` for something when
        ``block``; False once told to stop."""
        cancelled: set[str] = set()
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                self._fail_all(EngineError("engine stopped"))
                return False
            if kind == "add":
                self._waiting.extend(payload)
            elif kind == "cancel":
                cancelled.add(payload)
        if cancelled:
            self._drop(cancelled)
        return True

    def _drop(self, request_ids: set[str]) -> None:
        gone = {s.request.request_id: s.request for s in [*self._waiting, *self._live()]
                if s.request.request_id in request_ids}
        self._waiting = deque(s for s in self._waiting if s.request.request_id not in request_ids)
        leaving = [i for i, s in enumerate(self._running) if s is not None and s.request.request_id in request_ids]
        if leaving:
            self._retire(leaving)
        for request in gone.values():
            request.send(_END)

    def _fail_all(self, error: Exception) -> None:
        requests = {id(s.request): s.request for s in [*self._waiting, *self._live()]}
        self._waiting.clear()
        self._running = []
        self._batch = None
        for request in requests.values():
            request.send(error)

    def _live(self) -> list[_Sequence]:
        return [s for s in self._running if s is not None]

    def _keep_rows(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not self._running:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(rows)

    def _retire(self, rows: list[int]) -> None:
        """Rows whose sequence ended become holes; an all-hole batch is dropped."""
        if not any(s is None for s in self._running):
            self._holes_since = self.steps
        for row in rows:
            self._running[row] = None
        if not self._live():
            self._running, self._batch = [], None
        elif self._batch is not None:
            self._batch.retire(rows)

    def _compact(self, force: bool = False) -> None:
        """Drop the holes (a copy of the whole cache) once they cost more than they save.

        A hole costs its share of each step until an arrival fills it; compacting costs about
        half a step (SmolLM2, 32 rows). So holes stay while arrivals may come: compact when they
        are half the batch, when they have been there ``HOLE_STEPS`` steps, or when ``force``.
        """
        holes = sum(s is None for s in self._running)
        if not holes:
            return
        if force or 2 * holes >= len(self._running) or self.steps - self._holes_since >= self.HOLE_STEPS:
            self._keep_rows([i for i, s in enumerate(self._running) if s is not None])

    def _footprint(self, rows: int, length: int) -> int:
        return rows * length

    def _admit(self) -> bool:
        """Move waiting sequences into the batch while rows and the KV budget allow; whether any moved."""
        length = self._batch.length if self._batch is not None else 0
        live = len(self._live())
        holes = len(self._running) - live
        admitted: list[_Sequence] = []
        while self._waiting and live + len(admitted) < self.max_batch_size:
            seq = self._waiting[0]
            new_length = max(length, len(seq.token_ids()) + 1)
            added = len(admitted) + 1
            # Holes take arrivals no longer than the batch (_prefill).
            rows = len(self._running) + (max(0, added - holes) if new_length == length else added)
            # Leave a tenth of the budget for the batch to grow before anyone is preempted.
            if (admitted or live) and self._footprint(rows, new_length) > 0.9 * self.kv_cache_tokens:
                break
            admitted.append(self._waiting.popleft())
            length = new_length
        if admitted:
            self._prefill(admitted)
            self._peak_requests = max(self._peak_requests, len({id(s.request) for s in self._live()}))
        return bool(admitted)

    def _forward(
        self, input_ids: torch.Tensor, batch: KVBatch, position_ids: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        """Logits of the last position [rows, vocab], or of every position [rows, length, vocab]."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._attention_mask(batch, input_ids.shape[1]) if self._mask_4d else batch.mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self._cache_kwarg: batch.cache},
        )
        logits: torch.Tensor = out.logits if all_logits else out.logits[:, -1, :]
        return logits

    def _attention_mask(self, batch: KVBatch, width: int) -> torch.Tensor:
        """The 4-D boolean mask SDPA reads, built here in one or two operations: transformers
        builds it from the 2-D mask through its mask functions, ~12 % of a step's CPU on a tiny
        model. ``width`` new tokens: one (a decode step), or a prefill's (after cached prefixes,
        if any)."""
        mask = batch.mask.bool()
        if width == 1:
            return mask[:, None, None, :]
        past = mask.shape[1] - width
        causal = torch.ones(width, mask.shape[1], dtype=torch.bool, device=mask.device).tril(diagonal=past)
        # A padding position attends to itself, so no row of the mask is empty (that gives NaN
        # in SDPA, and a NaN key or value spoils even the rows that mask it out).
        itself = torch.zeros_like(causal)
        itself[:, past:] = torch.eye(width, dtype=torch.bool, device=mask.device)
        full = (causal & mask[:, None, :]) | itself
        return full[:, None, :, :]

    def _prompt_logprobs(self, seq: _Sequence, logits: torch.Tensor) -> list[TokenLogprob | None]:
        """``logits`` is this prompt's prefill row [width, vocab], the prompt right-aligned."""
        ids = seq.prompt_ids
        start = logits.shape[0] - len(ids)
        logprobs = torch.log_softmax(logits[start:-1].float(), dim=-1)  # predicts ids[1:]
        k = seq.params.logprobs or 0
        out: list[TokenLogprob | None] = [None]
        for j, token in enumerate(ids[1:]):
            top: list[tuple[int, float]] = []
            if k > 0:
                values, top_ids = torch.topk(logprobs[j], k)
                top = list(zip(top_ids.tolist(), values.tolist(), strict=True))
            out.append(TokenLogprob(token, float(logprobs[j, token]), top))
        return out

    def _prefill(self, seqs: list[_Sequence]) -> None:
        # Sequences with the same tokens (the n choices of one prompt) share one prefill row.
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(s.token_ids()), len(unique)) for s in seqs]
        prompts = [list(p) for p in unique]
        # Every position's logits only when someone asked for prompt logprobs (echo): it costs
        # width x vocab floats per row, and those rows cannot start from a cached prefix.
        wanting = [i for i, s in enumerate(seqs) if s.want_prompt_logprobs and s.prompt_logprobs is None]
        whole = {row_of[i] for i in wanting}  # their prefill rows
        found = [self.prefixes.match(p) if self.prefixes is not None and r not in whole else (0, [])
                 for r, p in enumerate(prompts)]
        past = _common_past(prompts, [n for n, _ in found])
        used = [min(n, past) for n, _ in found]
        width = max(len(p) - u for p, u in zip(prompts, used, strict=True))
        # Row r: its cached prefix right-aligned in the first `past` columns, then its other
        # tokens right-aligned in the `width` new ones (padding between them is masked).
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), past + width), dtype=torch.long)
        position_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, (p, u) in enumerate(zip(prompts, used, strict=True)):
            new = len(p) - u
            ids[r, width - new:] = torch.tensor(p[u:], dtype=torch.long)
            mask[r, past - u:past] = 1
            mask[r, past + width - new:] = 1
            position_ids[r, width - new:] = torch.arange(u, len(p))
        ids, mask, position_ids = ids.to(self.device), mask.to(self.device), position_ids.to(self.device)
        cache = new_cache()
        if past:
            layers = len(next(kv for _, kv in found if kv))
            for layer in range(layers):
                pairs = [kv[layer] if u else None for (_, kv), u in zip(found, used, strict=True)]
                cache.update(*_stack_prefixes(pairs, used, past), layer)
            assert self.prefixes is not None
            self.prefixes.hit_tokens += sum(used)
        for s, row in zip(seqs, row_of, strict=True):
            if not s.output_ids:  # a preempted sequence's recompute is not its request's prompt
                s.cached_tokens = used[row]
        part = KVBatch(cache, mask, mask.sum(-1))
        logits = self._forward(ids, part, position_ids, all_logits=bool(wanting))
        if self.prefixes is not None:
            self._keep_prefixes(prompts, used, part)
        if wanting:
            for i in wanting:
                seqs[i].prompt_logprobs = self._prompt_logprobs(seqs[i], logits[row_of[i]])
            logits = logits[:, -1, :]
        if len(prompts) != len(seqs):
            part.select(row_of)
            logits = logits[torch.tensor(row_of, device=logits.device)]
        keep = self._sample_and_emit(seqs, logits)
        if not keep:
            return
        part.select(keep)
        joining: list[_Sequence | None] = [seqs[i] for i in keep]
        if self._batch is None:
            self._batch, self._running = part, joining
            return
        holes = [i for i, s in enumerate(self._running) if s is None]
        if holes and part.length <= self._batch.length:
            # In place: no copy of the running rows' cache (worker/kvbatch.py).
            slots = holes[: part.rows]
            rest = list(range(len(slots), part.rows))
            self._batch.fill(slots, part, list(range(len(slots))))
            if rest:
                part.select(rest)
            for slot, seq in zip(slots, joining, strict=False):
                self._running[slot] = seq
            if not rest:
                return
            joining = joining[len(slots):]
        self._batch.extend(part)
        self._running.extend(joining)

    def _keep_prefixes(self, prompts: list[list[int]], used: list[int], part: KVBatch) -> None:
        """Give the prefix cache what these prompts computed that it lacks."""
        assert self.prefixes is not None
        for r, (p, u) in enumerate(zip(prompts, used, strict=True)):
            n = self.prefixes.wanted(p, u)
            if not n:
                continue
            # The row's real columns in order (its prefix, then the rest), the first n of them.
            cols = part.mask[r].nonzero().squeeze(1)[:n]
            kv = []
            for layer in part.cache.layers:
                at = cols.to(layer.keys.device)  # accelerate may place layers on several devices
                kv.append((layer.keys[r].index_select(1, at), layer.values[r].index_select(1, at)))
            self.prefixes.store(p, kv)

    def _decode(self) -> None:
        self._compact(force=len(self._running) > self.max_batch_size)
        # Preempt the newest sequences if one more column would pass the budget; they are
        # recomputed from their tokens when they are admitted again.
        budget = self.kv_cache_tokens
        while self._batch is not None and self._footprint(self._batch.rows, self._batch.length + 1) > budget:
            if any(s is None for s in self._running):
                self._compact(force=True)
                continue
            if len(self._running) <= 1:
                break
            seq = self._running[-1]
            assert seq is not None
            self._keep_rows(list(range(len(self._running) - 1)))
            self._waiting.appendleft(seq)
        batch = self._batch
        assert batch is not None
        running = self._running
        live = [i for i, s in enumerate(running) if s is not None]
        input_ids = torch.tensor([[s.output_ids[-1] if s is not None else self._pad_id] for s in running],
                                 dtype=torch.long, device=self.device)
        fit_rows(self.model, len(running))
        batch.grow()
        logits = self._forward(input_ids, batch, batch.positions.unsqueeze(1))
        batch.positions = batch.positions + 1
        self.steps += 1
        if len(live) != len(running):
            holes = torch.tensor([i for i, s in enumerate(running) if s is None], device=batch.positions.device)
            batch.positions[holes] = 0
            logits = logits[torch.tensor(live, device=logits.device)]
        keep = self._sample_and_emit([s for s in running if s is not None], logits)  # the rows in `live`
        if len(keep) != len(live):
            kept = set(keep)
            self._retire([row for j, row in enumerate(live) if j not in kept])

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Sample one token per sequence, send the text; returns the rows still running."""
        rows = [
            RowState(
                s.params, s.generator, s.prompt_ids, s.output_ids,
                list(self.eos_token_ids) if s.params.ignore_eos or len(s.output_ids) < s.params.min_tokens else [],
                s.constraint,
            )
            for s in seqs
        ]
        tokens, logprobs = sample(logits, rows)
        outputs: dict[int, list[ChoiceOutput]] = {}
        requests: dict[int, _Request] = {}
        keep: list[int] = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            seq.output_ids.append(token)
            if seq.constraint is not None:
                seq.constraint.accept(token)
            finish: str | None = None
            if token in self.eos_token_ids:
                text, finish = seq.stop.flush(), "stop"
            else:
                text, stopped = seq.stop.feed(seq.detok.add(token))
                if stopped:
                    finish = "stop"
                elif len(seq.output_ids) >= seq.max_tokens:
                    text, finish = text + seq.stop.flush(), "length"
            lp = logprobs[i]
            out = ChoiceOutput(seq.index, text, 1, finish, [lp] if lp is not None else [])
            if seq.want_prompt_logprobs and seq.prompt_logprobs is not None:
                out.prompt_logprobs, seq.want_prompt_logprobs = seq.prompt_logprobs, False
            if len(seq.output_ids) == 1:
                out.cached_tokens = seq.cached_tokens
            outputs.setdefault(id(seq.request), []).append(out)
            requests[id(seq.request)] = seq.request
            if finish is None:
                keep.append(i)
            else:
                seq.request.unfinished -= 1
        # One hand-over per event loop per step, not one per request: each call_soon_threadsafe
        # wakes the loop through its self-pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, list[Any]]]] = {}
        for key, request in requests.items():
            items: list[Any] = [outputs[key]] + ([_END] if request.unfinished == 0 else [])
            by_loop.setdefault(request.loop, []).append((request, items))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop was closed under us; drop its requests, keep the engine
                for request, _ in batch:
                    request.dead = True
        return keep


def _deliver(batch: list[tuple[_Request, list[Any]]]) -> None:
    """On the event loop: queue each request's items; they are handed over in one pass on the
    next turn, so the steps that arrived in one turn reach each callback merged."""
    called: list[_Request] = []
    for request, items in batch:
        if not request.pending:
            called.append(request)
        request.pending.extend(items)
    if called:
        asyncio.get_running_loop().call_soon(_call_back, called)


def _call_back(requests: list[_Request]) -> None:
    for request in requests:
        items, request.pending = request.pending, []
        finished = request.finished
        if finished.done():
            continue  # cancelled, or its callback failed: nobody wants more
        outputs: list[ChoiceOutput] = []
        end: Any = None
        for item in items:
            if item is _END or isinstance(item, BaseException):
                end = item
                break
            outputs.extend(item)
        try:
            if outputs:
                request.on_outputs(merge(outputs))
        except Exception as exc:  # the caller's bug: end this request, not the others
            end = exc
        if end is _END:
            finished.set_result(None)
        elif end is not None:
            finished.set_exception(end)


def _common_past(prompts: list[list[int]], cached: list[int]) -> int:
    """How many cache columns a prefill starts with: the cached prefix length (one of
    ``cached``, or 0) that leaves the fewest new columns, every row's prefix cut to it. A row
    without one then computes its whole prompt in the new columns, so a choice that would make
    the batch longer than its longest prompt is not taken."""
    longest = max(len(p) for p in prompts)
    best_width, best = longest, 0
    for past in sorted(set(cached) - {0}):
        width = max(len(p) - min(n, past) for p, n in zip(prompts, cached, strict=True))
        if past + width <= longest and width < best_width:
            best_width, best = width, past
    return best


def _stack_prefixes(pairs: list[LayerKV | None], used: list[int], past: int) -> LayerKV:
    """One layer's cache for a prefill: row r holds its prefix's first ``used[r]`` tokens,
    right-aligned in ``past`` columns (zeros before them; a row without one is all zeros)."""
    like_k, like_v = next(pair for pair in pairs if pair is not None)
    keys, values = [], []
    for pair, u in zip(pairs, used, strict=True):
        if pair is not None and u == past:
            keys.append(pair[0][:, :past])
            values.append(pair[1][:, :past])
            continue
        k = like_k.new_zeros((like_k.shape[0], past, like_k.shape[-1]))
        v = like_v.new_zeros((like_v.shape[0], past, like_v.shape[-1]))
        if pair is not None and u:
            k[:, past - u:] = pair[0][:, :u]
            v[:, past - u:] = pair[1][:, :u]
        keys.append(k)
        values.append(v)
    return torch.stack(keys), torch.stack(values)


def _name_thread(name: str) -> None:
    """Name the calling thread for the OS (``top -H``, ``ps -L``, bench/cpu_cost.py); Linux only.
    Threads it clones (its OpenMP workers) start with the same name."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name[:15])
    except OSError as exc:
        log.debug("could not name the engine thread: %s", exc)


def _lower_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux: nice is per thread)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as exc:
        log.warning("could not lower the engine thread's priority: %s", exc)


def _plain_sdpa(config: Any) -> bool:
    """Whether the model attends with SDPA, causally over every cached token: then the engine
    may hand it a ready 4-D mask. Sliding windows and chunked attention need transformers' own."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "attention_chunk_size", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def _forward_params(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
