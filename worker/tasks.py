"""The arq job: a Job in, numbered events out; it always ends with ``done`` or ``error``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tokenrelay import wire
from worker import tools
from worker.constraints import Grammars, GrammarSpec, output_vocab_size, spec_for_response_format
from worker.engine import Engine, EngineError
from worker.errors import InvalidRequest, WorkerError
from worker.outputs import ChoiceOutput
from worker.prompts import prepare
from worker.publish import EventSink, Publisher
from worker.sampling import Constraint, TokenLogprob
from worker.token_bytes import TokenBytes

log = logging.getLogger(__name__)

# Cancels heard for requests not running here yet: a job claimed a moment ago may hear its cancel
# before it starts. Every worker hears every cancel, so only the latest are kept.
_RECENT_CANCELS = 1024
# The started event waits this long for the first token, to go out in its message: under load a
# wave of requests then costs the gateway and its clients one wake-up each instead of two, while
# the engine prefills the wave. A slow prefill sends it alone, so the gateway learns the worker
# (and checks it is alive) soon anyway.
STARTED_WAIT_S = 0.2


class Runtime:
    """What every job of this worker shares.

    Keyword-only arguments: engine, tokenizer, redis (an ArqRedis), worker_id, context_length,
    max_request_tokens, default_temperature and default_top_p (for requests that set none),
    job_timeout (seconds a request may take once started; None: no limit).
    """

    def __init__(self, *, engine: Engine, tokenizer: Any, redis: Any, worker_id: str, context_length: int,
                 max_request_tokens: int, default_temperature: float | None = None,
                 default_top_p: float | None = None, job_timeout: float | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.redis = redis
        self.events = EventSink(redis)
        self.worker_id = worker_id
        self.context_length = context_length
        self.max_request_tokens = max_request_tokens
        self.default_temperature = default_temperature
        self.default_top_p = default_top_p
        self.job_timeout = job_timeout
        self.active: set[str] = set()  # requests this worker is running now
        self.cancelled: set[str] = set()  # of those, the ones whose client left
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._token_text: dict[int, str] = {}
        self._token_bytes = TokenBytes(tokenizer)
        self._grammars: Grammars | None = None
        self._grammars_lock = asyncio.Lock()

    def cancel(self, request_id: str) -> None:
        if request_id in self.active:
            self.cancelled.add(request_id)
            self.engine.cancel(request_id)
        else:
            self._recent_cancels[request_id] = None
            if len(self._recent_cancels) > _RECENT_CANCELS:
                self._recent_cancels.popitem(last=False)

    async def _abandoned(self, job: wire.Job, marked: bool | None) -> bool:
        """``marked``: whether the gateway's cancel marker was set when the job was claimed
        (None: not known, so ask Redis)."""
        if time.time() > job.deadline or job.request_id in self._recent_cancels:
            return True
        if marked is None:
            marked = bool(await self.redis.exists(wire.cancel_marker_key(job.request_id)))
        return marked

    async def run(self, payload: dict[str, Any], job_try: int, marked: bool | None = None) -> None:
        request_id = str(payload.get("request_id", "unknown"))
        reply_to = payload.get("reply_to")
        if not isinstance(reply_to, str) or not reply_to:
            # Nobody to tell: a gateway of another protocol version sent it.
            log.error("dropping %s: the job names no reply channel (protocol %s, ours %d)",
                      request_id, payload.get("version"), wire.PROTOCOL_VERSION)
            return
        out = Publisher(self.events, reply_to, request_id)
        try:
            job = wire.Job.from_dict(payload)
        except (TypeError, ValueError, KeyError) as exc:
            await out.send(wire.error_event, status=400, message=f"malformed job: {exc}",
                           type_="invalid_request_error")
            return
        self.active.add(request_id)
        try:
            await self._run(job, job_try, marked, out)
        finally:
            self.active.discard(request_id)
            self.cancelled.discard(request_id)

    async def _run(self, job: wire.Job, job_try: int, marked: bool | None, out: Publisher) -> None:
        request_id = job.request_id
        if job_try > 1 or await self._abandoned(job, marked) or request_id in self.cancelled:
            # The gateway gave up on it (client gone, deadline passed, or a worker died on it).
            log.info("dropping %s: abandoned before start (try %d)", request_id, job_try)
            return
        deadline = asyncio.timeout(self.job_timeout)
        try:
            async with deadline:
                await self._generate(job, out)
        except TimeoutError:
            if not deadline.expired():
                raise
            # Said here, not by arq's own timeout (a backstop): that one would look like a
            # shutdown to this code, and the client would read "The worker shut down."
            await out.send(wire.error_event, status=504, code="job_timeout",
                           message=f"The request ran longer than this worker's job timeout ({self.job_timeout:g} s).")
        except asyncio.CancelledError:
            self.engine.cancel(request_id)
            await asyncio.shield(out.send(wire.error_event, status=503, message="The worker shut down.",
                                          code="worker_shutdown"))
            raise
        except WorkerError as exc:
            await out.send(wire.error_event, status=exc.status, message=exc.message, type_=exc.type,
                           param=exc.param, code=exc.code)
        except EngineError as exc:
            await out.send(wire.error_event, status=500, message=str(exc), code="generation_failed")
        except Exception as exc:
            log.exception("request %s failed", request_id)
            await out.send(wire.error_event, status=500, message=f"internal error: {type(exc).__name__}")

    async def _grammar_engine(self, param: str) -> Grammars:
        """xgrammar's tokenizer index, built on the first structured request (seconds for a big
        vocabulary, so never at startup and never on the event loop)."""
        async with self._grammars_lock:
            if self._grammars is None:
                vocab = output_vocab_size(self.engine.model)
                try:
                    self._grammars = await asyncio.to_thread(
                        Grammars, self.tokenizer, vocab_size=vocab, stop_token_ids=self.engine.eos_token_ids)
                except ImportError:
                    raise InvalidRequest(f"'{param}' needs xgrammar, which this worker lacks "
                                         "(install tokenrelay[worker]).", param=param,
                                         code="unsupported_parameter") from None
            return self._grammars

    async def _constraint(self, job: wire.Job) -> Callable[[], Constraint] | None:
        """A forced tool call's grammar, else the response_format's, else None."""
        schema = tools.forced_call_schema(job)
        spec = GrammarSpec.of(schema, "tools") if schema is not None else spec_for_response_format(job.response_format)
        if spec is None:
            return None
        grammars = await self._grammar_engine(spec.param)
        return grammars.factory(await asyncio.to_thread(grammars.compile, spec))

    async def _generate(self, job: wire.Job, out: Publisher) -> None:
        # The rendered job may carry the tools as prompt text only; the job itself keeps them.
        prompts = prepare(self.tokenizer, tools.render_job(self.tokenizer, job), context_length=self.context_length,
                          max_request_tokens=self.max_request_tokens)
        rows = len(prompts.ids) * job.n
        if rows > self.engine.max_batch_size:
            raise InvalidRequest(
                f"This request needs {rows} sequences (prompts x n) but a worker runs at most "
                f"{self.engine.max_batch_size} at once.", param="n")
        params = job.sampling
        if params.temperature is None:
            params = replace(params, temperature=self.default_temperature)
        if params.top_p is None:
            params = replace(params, top_p=self.default_top_p)
        constraint = await self._constraint(job)
        if job.request_id in self.cancelled:
            return  # the client left while the prompt was prepared
        def start() -> None:
            # Once, as the request's first event (nothing else goes out before it). Posted, not
            # sent: later events go out after it (the sink keeps order), so its failure shows at
            # the done event below.
            if out.seq == 0:
                out.post(wire.started_event, worker_id=self.worker_id, prompt_tokens=prompts.token_count)

        completion_tokens = cached_tokens = 0
        echo_pending = set(range(rows)) if job.echo else set()
        names = set(tools.tool_names(job.tools))
        parsers = {i: tools.ToolCallParser(names, parallel=job.parallel_tool_calls)
                   for i in range(rows)} if tools.calls_possible(job) else {}

        def on_outputs(outputs: list[ChoiceOutput]) -> None:
            # Called by the event loop for every request of a step in one pass: no await here,
            # so a step costs no task switch per request.
            nonlocal completion_tokens, cached_tokens
            start()
            choices = []
            for o in outputs:
                completion_tokens += o.tokens
                if o.cached_tokens and o.index % job.n == 0:  # a prompt's n choices share its prefill
                    cached_tokens += o.cached_tokens
                text = o.text
                if o.index in echo_pending:
                    echo_pending.discard(o.index)
                    text = prompts.texts[o.index // job.n] + text
                choices.append(self._delta(o, text, parsers.get(o.index), prompts.ids[o.index // job.n]))
            out.post(wire.delta_event, choices)

        # Events go out in order, so when Redis fails the done event below fails too, and an
        # event lost in between is a seq gap the gateway reports. A failure before the first
        # token is the request's first event: the gateway answers it with its own status.
        timer = asyncio.get_running_loop().call_later(STARTED_WAIT_S, start)
        try:
            await self.engine.submit(job.request_id, prompts.ids, n=job.n, params=params,
                                     max_tokens=prompts.max_tokens, on_outputs=on_outputs, constraint=constraint,
                                     prompt_logprobs=job.echo and params.logprobs is not None)
        finally:
            timer.cancel()
        if job.request_id in self.cancelled:
            return  # the client left; nobody reads a done event
        start()
        await out.send(wire.done_event, prompt_tokens=prompts.token_count,
                       completion_tokens=completion_tokens, cached_tokens=cached_tokens)

    def _delta(
        self, o: ChoiceOutput, text: str, parser: tools.ToolCallParser | None, prompt_ids: list[int]
    ) -> dict[str, Any]:
        logprobs = [self._logprob(lp) for lp in o.logprobs] if o.logprobs else None
        if o.prompt_logprobs is not None:
            # echo + logprobs: the prompt's tokens come first, as OpenAI's completions do.
            logprobs = [self._prompt_logprob(lp, token) for lp, token in
                        zip(o.prompt_logprobs, prompt_ids, strict=True)] + (logprobs or [])
        finish = o.finish_reason
        wire_calls: list[dict[str, Any]] = []
        if parser is not None:
            first = parser.calls
            text, calls = parser.feed(text)
            if finish is not None:
                rest, more, finish = parser.finish(finish)
                text, calls = text + rest, calls + more
            wire_calls = [c.to_wire(first + k) for k, c in enumerate(calls)]
        return wire.choice_delta(o.index, text, tokens=o.tokens, finish_reason=finish,  # type: ignore[arg-type]
                                 logprobs=logprobs, tool_calls=wire_calls or None)

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        """``token`` is the token decoded alone (U+FFFD for part of a character); ``bytes`` are
        its own raw bytes, so joining them rebuilds characters split across tokens."""
        return {"token": self._text(token_id), "logprob": logprob, "bytes": list(self._token_bytes(token_id))}

    def _prompt_logprob(self, lp: TokenLogprob | None, token_id: int) -> dict[str, Any]:
        if lp is not None:
            return self._logprob(lp)
        # The first prompt token has no context, so no logprob.
        return {**self._entry(token_id, None), "top_logprobs": None}

    def _logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        return {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(t, v) for t, v in lp.top]}


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """The arq function ``wire.GENERATE_FUNCTION``."""
    runtime: Runtime = ctx["runtime"]
    # worker.queue.BatchWorker reads the cancel marker as it claims the job; plain arq does not.
    marked = ctx.get("cancelled")
    try:
        await runtime.run(payload, int(ctx.get("job_try", 1)), None if marked is None else bool(marked))
    finally:
        # The engine row is free and the last event is out: the next job may start while arq
        # writes this one's result (worker/queue.py: BatchWorker).
        release = ctx.get("release")
        if release is not None:
            release()

