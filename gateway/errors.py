"""The gateway's one exception type and the one place that turns errors into OpenAI's envelope.

Every error response, whatever raised it, has the body
``{"error": {"message", "type", "param", "code"}}``: the openai SDK reads those four fields to
build its exception, and frameworks built on it match on ``code``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic_core import ErrorDetails
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    """An error answered to the client: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.message!r}, type={self.type!r}, code={self.code!r})"


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def server_error(status: int, message: str, code: str) -> OpenAIError:
    return OpenAIError(status, message, "server_error", None, code)


def queue_full(model: str, waiting: int) -> OpenAIError:
    message = (f"Too many requests are waiting for model `{model}` ({waiting} queued); "
               "retry after a short wait.")
    return OpenAIError(429, message, "rate_limit_error", None, "queue_full", {"retry-after": "1"})


def queue_timeout_error(seconds: float) -> OpenAIError:
    """503 with ``x-should-retry: false``: the SDKs retry every 5xx twice by default, which would
    make the client wait three queue timeouts for the same answer."""
    message = (f"No worker started the request within {seconds:g} s: the model's workers are busy or gone. "
               "Try again later.")
    return OpenAIError(503, message, "server_error", None, "queue_timeout", {"x-should-retry": "false"})


def redis_unavailable() -> OpenAIError:
    message = "The request queue (Redis) is not reachable; try again later."
    return server_error(503, message, "redis_unavailable")


def from_error_event(event: Mapping[str, Any], max_tokens_param: str = "max_tokens") -> OpenAIError:
    """A worker's ``error`` event, trusted only as far as its shape checks out.

    The worker names the completion budget ``max_tokens`` whichever field set it; a context-length
    error names ``max_tokens_param`` instead, the field the client sent (``max_completion_tokens``).
    """
    raw = event.get("error")
    error: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    status = event.get("status")
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 500

    def text(key: str) -> str | None:
        value = error.get(key)
        return value if isinstance(value, str) else None

    param, code = text("param"), text("code")
    if code == "context_length_exceeded" and param == "max_tokens":
        param = max_tokens_param
    return OpenAIError(
        status,
        text("message") or "The worker failed to process the request.",
        text("type") or "server_error",
        param,
        code,
        # A retry would run the same request into the same limit.
        {"x-should-retry": "false"} if code == "job_timeout" else None,
    )


_BELOW_MIN = ("greater_than", "greater_than_equal")
_ABOVE_MAX = ("less_than", "less_than_equal")
_LENGTH_CODES = {
    "too_short": "array_below_min_length",
    "too_long": "array_above_max_length",
    "string_too_short": "string_below_min_length",
    "string_too_long": "string_above_max_length",
}


def validation_error_code(error: ErrorDetails) -> str:
    """The OpenAI ``code`` for a pydantic validation error: what OpenAI answers for the same mistake
    (``decimal_above_max_value``, ``missing_required_parameter``, ``invalid_type``, ...). Our own
    errors (type ``invalid_value``) carry their code in the context."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "invalid_value":  # ours: the code travels in the context
        return str(ctx.get("code") or "invalid_value")
    if kind == "missing":
        return "missing_required_parameter"
    if kind in _BELOW_MIN or kind in _ABOVE_MAX:
        # Float fields carry float bounds (pydantic converts them), integer fields int bounds.
        bound = next((ctx[k] for k in ("ge", "gt", "le", "lt") if k in ctx), None)
        number = "decimal" if isinstance(bound, float) else "integer"
        return f"{number}_below_min_value" if kind in _BELOW_MIN else f"{number}_above_max_value"
    if kind == "too_short" and ctx.get("actual_length") == 0:
        return "empty_array"
    if kind in _LENGTH_CODES:
        return _LENGTH_CODES[kind]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "invalid_type"
    return "invalid_value"  # literal_error, string_pattern_mismatch, finite_number, ...


def as_openai_error(exc: BaseException) -> OpenAIError:
    """Any exception as the error the client sees; unexpected ones are logged with traceback."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        log.warning("redis unavailable: %s", exc)
        return redis_unavailable()
    log.error("unexpected error", exc_info=exc)
    return server_error(500, "The server had an error while processing your request.", "internal_error")


def error_response(error: OpenAIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _openai_error_handler(request: Request, exc: Exception) -> Response:
    return error_response(as_openai_error(exc))


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(OpenAIError(exc.status_code, message, kind, headers=exc.headers))


# Registered on the Starlette app. ``Exception`` is a last resort: the request-id middleware
# already answers unexpected errors itself, so its responses carry the header.
EXCEPTION_HANDLERS = {
    OpenAIError: _openai_error_handler,
    RedisConnectionError: _openai_error_handler,
    RedisTimeoutError: _openai_error_handler,
    HTTPException: _http_exception_handler,
    Exception: _openai_error_handler,
}
