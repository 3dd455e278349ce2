"""The wire contract between gateway and worker: job payload, event messages, Redis names.

This is the only module both sides import. Everything here is plain data and JSON; it must
never import torch, transformers or Starlette.

Flow: each gateway process SUBSCRIBEs once, at its first request, to its own
``reply_channel(gateway_id)``. Per request it enqueues an arq job ``GENERATE_FUNCTION`` on
``queue_name(model)`` with one argument, ``Job.to_dict()``, whose ``reply_to`` names that channel.
The worker publishes the job's numbered events there: exactly one ``started`` or ``error`` first,
then ``delta`` events, and always ends with ``done`` or ``error``. ``seq`` starts at 0 and grows
by one per event, so the gateway can tell a lost message from the end of the stream. One message
carries events of any number of that gateway's requests (``encode_events``), so a worker sends
one message per gateway per engine step, not one per request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import orjson
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix

PROTOCOL_VERSION = 2
GENERATE_FUNCTION = "generate"

# How often a worker refreshes its registry key, and how long the key lives. A worker killed
# with SIGKILL disappears from the registry WORKER_TTL seconds after its last heartbeat; the
# gateway uses that to end a request whose worker went silent.
HEARTBEAT_INTERVAL_S = 1.0
WORKER_TTL_S = 4.0
# A cancel marker outlives any queue wait, so a job picked up after its client left is dropped.
CANCEL_MARKER_TTL_S = 3600

_PREFIX = "tokenrelay"
CANCEL_CHANNEL = f"{_PREFIX}:cancel"
WORKER_KEY_PATTERN = f"{_PREFIX}:worker:*"


def queue_name(model: str) -> str:
    """One arq queue per served model, so a job only reaches workers holding that model."""
    return f"{_PREFIX}:queue:{model}"


def wake_channel(model: str) -> str:
    """Published after each enqueue, so idle workers of that model poll now, not at their next tick."""
    return f"{_PREFIX}:wake:{model}"


def reply_channel(gateway_id: str) -> str:
    """Where workers publish the events of one gateway process's requests."""
    return f"{_PREFIX}:replies:{gateway_id}"


REPLY_CHANNEL_PATTERN = reply_channel("*")


def cancel_marker_key(request_id: str) -> str:
    return f"{_PREFIX}:cancelled:{request_id}"


def worker_key(worker_id: str) -> str:
    return f"{_PREFIX}:worker:{worker_id}"


# arq's own keys for a job (the job id is the request id): the job's payload, the marker a worker
# sets when it takes the job, its try counter and its result. The gateway writes the first itself
# (one round trip) and reads the others to refuse a taken id and to withdraw a job nobody started;
# the worker's claim script (worker/queue.py) builds them from these prefixes (the id left empty).
def arq_job_key(request_id: str) -> str:
    return f"{job_key_prefix}{request_id}"


def arq_in_progress_key(request_id: str) -> str:
    return f"{in_progress_key_prefix}{request_id}"


def arq_result_key(request_id: str) -> str:
    return f"{result_key_prefix}{request_id}"


def arq_retry_key(request_id: str) -> str:
    """arq's try counter for a job; a worker reads a try above 1 as "a worker died on it"."""
    return f"{retry_key_prefix}{request_id}"


def serialize_job(data: dict[str, Any]) -> bytes:
    """arq job (de)serializer: JSON instead of arq's default pickle, so no payload runs code."""
    return orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS)


def deserialize_job(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(data)
    return result


@dataclass
class SamplingParams:
    """Per-choice generation settings. ``None`` means "the worker's default" (the request left
    the field out): for temperature and top_p that is the worker's --default-temperature /
    --default-top-p, else 1.0 as OpenAI; for max_tokens, the rest of the context."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    min_tokens: int = 0
    # Number of alternatives per token to return (0 = only the chosen token's logprob);
    # None = no logprobs at all.
    logprobs: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "logit_bias" in values:
            values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"].items()}
        return cls(**values)


@dataclass
class Job:
    """One OpenAI request as the worker receives it.

    ``kind`` is ``chat`` (``messages`` set, rendered with the chat template) or ``completion``
    (``prompts`` set: each a string or a list of token ids). The response has
    ``len(prompts) * n`` choices for completions and ``n`` for chat; choice ``i`` of prompt ``p``
    has index ``p * n + i``.
    """

    request_id: str
    model: str
    kind: Literal["chat", "completion"]
    deadline: float  # epoch seconds; a job not started by then is dropped
    reply_to: str = ""  # the gateway's reply_channel; the gateway's relay sets it as it enqueues
    n: int = 1
    messages: list[dict[str, Any]] | None = None
    prompts: list[str | list[int]] | None = None
    echo: bool = False
    # ``tools`` as OpenAI sends them; ``tool_choice`` is "none" | "auto" | "required" |
    # ``{"type": "function", "function": {"name": ...}}``; ``response_format`` is None for plain
    # text, else ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        # Not asdict, which deep-copies every message: the gateway serializes this at once.
        data = dict(vars(self))
        data["sampling"] = dict(vars(self.sampling))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["sampling"] = SamplingParams.from_dict(values.get("sampling") or {})
        return cls(**values)


# ---- events -------------------------------------------------------------------------------
# Each event is one JSON object with "seq" and "type". Builders below are the only place the
# worker spells them; the gateway reads them with parse_events.

EventType = Literal["started", "delta", "done", "error"]
FinishReason = Literal["stop", "length", "tool_calls"]


def started_event(seq: int, *, worker_id: str, prompt_tokens: int) -> dict[str, Any]:
    return {"seq": seq, "type": "started", "worker_id": worker_id, "prompt_tokens": prompt_tokens}


def choice_delta(
    index: int,
    text: str,
    *,
    tokens: int = 0,
    finish_reason: FinishReason | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice's progress: ``text`` is new text, ``tokens`` how many tokens it took.

    ``logprobs`` is a list, one entry per token in this delta:
    ``{"token": str, "logprob": float, "bytes": list[int], "top_logprobs": [{"token",
    "logprob", "bytes"}]}``.

    ``tool_calls`` lists the tool calls completed in this delta, each whole (never a fragment):
    ``{"index": int, "id": str, "name": str, "arguments": str}``, ``index`` counting the
    choice's calls from 0 and ``arguments`` a JSON text. The key is left out when there are none,
    so older gateways read the event unchanged.
    """
    delta: dict[str, Any] = {
        "index": index,
        "text": text,
        "tokens": tokens,
        "finish_reason": finish_reason,
        "logprobs": logprobs,
    }
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return delta


def delta_event(seq: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"seq": seq, "type": "delta", "choices": choices}


def done_event(seq: int, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """``cached_tokens``: of ``prompt_tokens``, those whose KV came from the worker's prefix cache
    (OpenAI's ``usage.prompt_tokens_details.cached_tokens``; a gateway reads 0 where it is absent)."""
    return {
        "seq": seq,
        "type": "done",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
    }


def error_event(
    seq: int,
    *,
    status: int,
    message: str,
    type_: str = "server_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """``status`` is the HTTP status the gateway answers with if no byte was sent yet."""
    return {
        "seq": seq,
        "type": "error",
        "status": status,
        "error": {"message": message, "type": type_, "param": param, "code": code},
    }


def encode_events(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    """One reply message: ``[[request_id, event], ...]``, each request's events in seq order.

    orjson, here and in ``parse_events``: every token passes through both, and the stdlib's
    encoder cost several times as much (docs/benchmarks-notes.md). A float that is not finite
    becomes null, as in any JSON."""
    return orjson.dumps(events, option=orjson.OPT_NON_STR_KEYS)


def parse_events(data: bytes | str) -> list[tuple[str, dict[str, Any]]]:
    """The (request_id, event) pairs of one reply message; ValueError if it is not one."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # a ValueError; the message says where
        raise ValueError(f"not a tokenrelay reply message: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"not a tokenrelay reply message: {data!r:.200}")
    out: list[tuple[str, dict[str, Any]]] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], dict) or "seq" not in item[1] or "type" not in item[1]):
            raise ValueError(f"not a tokenrelay event: {item!r:.200}")
        out.append((item[0], item[1]))
    return out


@dataclass
class WorkerInfo:
    """What a worker announces under ``worker_key(worker_id)`` (JSON, TTL ``WORKER_TTL_S``)."""

    worker_id: str
    model: str
    capacity: int  # sequences it generates at once (arq max_jobs follows it)
    context_length: int
    max_request_tokens: int  # prompt + max_tokens over this is refused
    started_at: float
    hostname: str = ""
    pid: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerInfo:
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
