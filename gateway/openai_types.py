"""OpenAI request bodies: validation with OpenAI's ranges and error params, and conversion to jobs.

Unknown fields are accepted and ignored (clients and frameworks send many; refusing them is a
known peer failure), but fields that would change the answer and that we cannot honour yet are
refused by name in ``refuse_unsupported``, never silently dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from gateway.errors import OpenAIError, invalid_request, validation_error_code
from gateway.structured import ResponseFormat, Tool, check_tool_choice, parse_response_format
from tokenrelay import wire

log = logging.getLogger(__name__)


# Strict types: OpenAI refuses "0.5" for a number and true for an integer, and so do we.
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2, allow_inf_nan=False)]
Fraction = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]
TokenCount = Annotated[StrictInt, Field(ge=1)]


def _invalid(message: str, sub: str = "", code: str = "invalid_value") -> PydanticCustomError:
    """A validation error with our own message; ``sub`` extends the param below the field, and
    ``code`` is the error's OpenAI ``code``."""
    return PydanticCustomError("invalid_value", message, {"sub": sub, "code": code})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class _Request(BaseModel):
    """Fields shared by chat and completions."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: StrictInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Any = None
    # vLLM-style extensions sent as extra body
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Fraction | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    # Accepted and ignored: they do not change the generated text.
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: Any = None
    # Declared so refuse_unsupported can look at them; see there.
    best_of: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise _invalid("'stop' must be a string, a list of strings, or null.")
        if len(items) > 4:
            raise _invalid(f"'stop' accepts at most 4 sequences, got {len(items)}.",
                           code="array_above_max_length")
        return [s for s in items if s]

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> dict[int, float]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _invalid("'logit_bias' must be an object mapping token ids to numbers.")
        bias: dict[int, float] = {}
        for key, amount in value.items():
            try:
                token = int(key)
            except ValueError:
                raise _invalid(f"'logit_bias' key {key!r} is not a token id.") from None
            if token < 0:
                raise _invalid(f"'logit_bias' key {key!r} is not a token id.")
            ok = isinstance(amount, int | float) and not isinstance(amount, bool)
            if not ok or not -100 <= amount <= 100:
                raise _invalid(f"'logit_bias' value for {key!r} must be a number between -100 and 100.")
            bias[token] = float(amount)
        return bias

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: Any) -> ResponseFormat | None:
        return parse_response_format(value)

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        return check_tool_choice(value)

    @model_validator(mode="after")
    def _check_stream_options(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise _invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                           "stream_options")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> _Request:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise _invalid("Tool names must be unique.", "tools")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise _invalid("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise _invalid(f"'tool_choice' names the function '{choice['function']['name']}', "
                           "which is not in 'tools'.", "tool_choice")
        return self

    def structured(self) -> dict[str, Any]:
        """The Job fields for tools and response_format."""
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in self.tools or []] or None
        return {
            "tools": tools,
            "tool_choice": (self.tool_choice or "auto") if tools else None,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "response_format": self.response_format.for_job() if self.response_format else None,
        }

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> wire.SamplingParams:
        return wire.SamplingParams(
            max_tokens=max_tokens,
            # None lets the worker apply the model's defaults (as vLLM does with generation_config).
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k or 0, 0),  # -1 and 0 both mean "off"
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=list(self.stop or []),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=dict(self.logit_bias or {}),
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
            logprobs=logprobs,
        )

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _text_content(value: Any) -> str | None:
    """A message's content as one string: text parts are joined, other parts are refused."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _invalid("'content' must be a string, a list of content parts, or null.")
    texts: list[str] = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise _invalid("A text content part needs a string 'text'.", f"[{i}].text")
        elif isinstance(kind, str):
            raise _invalid(f"Content parts of type '{kind}' are not supported: only 'text' parts are.",
                           f"[{i}].type")
        else:
            raise _invalid("A content part must be an object with a 'type'.", f"[{i}]")
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> str | None:
        return _text_content(value)

    @model_validator(mode="after")
    def _check_roles(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _invalid(f"Missing required parameter: 'content' (a '{self.role}' message needs content).",
                           "content", "missing_required_parameter")
        if self.role == "tool" and not self.tool_call_id:
            raise _invalid("A 'tool' message needs a 'tool_call_id'.", "tool_call_id", "missing_required_parameter")
        return self

    def normalised(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content or "",
        }
        for key in ("tool_calls", "tool_call_id", "name"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        return message


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        return self

    @property
    def max_new_tokens(self) -> tuple[int | None, str]:
        """The completion budget and the field that set it (the newer name wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def choice_count(self) -> int:
        return self.choices_per_prompt

    def to_job(self, request_id: str, deadline: float) -> wire.Job:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return wire.Job(
            request_id=request_id,
            model=self.model,
            kind="chat",
            deadline=deadline,
            n=self.choices_per_prompt,
            messages=[m.normalised() for m in self.messages],
            sampling=self.sampling(self.max_new_tokens[0], logprobs),
            **self.structured(),
        )


class CompletionRequest(_Request):
    prompt: Any
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str | list[int]]:
        def is_ids(item: Any) -> bool:
            return (isinstance(item, list) and bool(item)
                    and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item))

        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return list(value)
            if is_ids(value):
                return [list(value)]
            if all(is_ids(p) for p in value):
                return [list(p) for p in value]
        if isinstance(value, list) and not value:
            raise _invalid("'prompt' must not be an empty list.", code="empty_array")
        raise _invalid("'prompt' must be a string, a list of strings, a list of token ids, "
                       "or a list of lists of token ids.")

    @property
    def max_new_tokens(self) -> tuple[int | None, str]:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def choice_count(self) -> int:
        return len(self.prompt) * self.choices_per_prompt

    def to_job(self, request_id: str, deadline: float) -> wire.Job:
        return wire.Job(
            request_id=request_id,
            model=self.model,
            kind="completion",
            deadline=deadline,
            n=self.choices_per_prompt,
            prompts=list(self.prompt),
            echo=bool(self.echo),
            sampling=self.sampling(self.max_new_tokens[0], self.logprobs),
            response_format=self.response_format.for_job() if self.response_format else None,
        )


def refuse_unsupported(request: _Request) -> None:
    """The one place listing what we accept in the schema but cannot honour yet.

    To support one of these, delete its line here and pass the value on in ``to_job``.
    """
    completion = isinstance(request, CompletionRequest)
    refusals: list[tuple[str, bool]] = [
        # Tools need chat turns; completions take a response_format but no tools.
        ("tools", completion and bool(request.tools)),
        ("tool_choice", completion and request.tool_choice not in (None, "none")),
        ("functions", request.functions is not None),
        ("function_call", request.function_call is not None),
        ("audio", request.audio is not None),
        ("modalities", request.modalities not in (None, ["text"])),
        ("prediction", request.prediction is not None),
        ("best_of", request.best_of is not None and request.best_of != request.choices_per_prompt),
        ("suffix", isinstance(request, CompletionRequest) and request.suffix not in (None, "")),
    ]
    for param, refused in refusals:
        if refused:
            raise invalid_request(f"'{param}' is not supported by this server yet.", param,
                                  "unsupported_parameter")


# ---- parsing ------------------------------------------------------------------------------

_logged_unknown: set[str] = set()
R = TypeVar("R", ChatCompletionRequest, CompletionRequest)


def parse_request(body: bytes, model: type[R]) -> R:
    """Raw body → validated request, or an ``OpenAIError`` 400 naming the offending param."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid_request(
            "We could not parse the JSON body of your request: the body is not valid JSON. "
            "Send a JSON object with 'Content-Type: application/json'."
        ) from None
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc.errors(include_url=False)[0]) from None
    refuse_unsupported(request)
    _log_unknown(request.model_extra or {})
    return request


def _log_unknown(extra: Mapping[str, Any]) -> None:
    for name in extra:
        if name not in _logged_unknown:
            _logged_unknown.add(name)
            log.info("ignoring unknown request field %r (logged once)", name)


def _from_validation_error(error: ErrorDetails) -> OpenAIError:
    param = ""
    for part in error["loc"]:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    ctx = error.get("ctx") or {}
    sub = str(ctx.get("sub", "")) if error["type"] == "invalid_value" else ""
    if sub:
        param += sub if sub.startswith("[") or not param else f".{sub}"
    if error["type"] == "invalid_value":
        message = error["msg"]
    elif error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid '{param}': {error['msg'][:1].lower()}{error['msg'][1:]}"
        if not isinstance(error["input"], dict | list):
            message += f" (got {json.dumps(error['input'])[:100]})"
        message += "."
    return invalid_request(message, param or None, validation_error_code(error))
