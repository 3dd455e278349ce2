"""The worker's error tree; each becomes one ``error`` event (tasks.py is the one place)."""

from __future__ import annotations


class WorkerError(Exception):
    """An error the client should see, with the HTTP status the gateway answers with."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(WorkerError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unavailable(WorkerError):
    status = 503
    code = "worker_unavailable"
