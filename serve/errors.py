"""One error shape for every client mistake: ``{"error": {"code": ..., "message": ...}}``.

Handlers raise :class:`ApiError` with a stable machine-readable code and a
message that names the problem (the field, the limit, what was received);
the ingress turns it, FastAPI's own 404/405/422 and anything unexpected into
that JSON body, so a client never has to parse HTML or tracebacks.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the server refuses, with the HTTP status it deserves."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray processes
        return (ApiError, (self.status, self.code, self.message, self.headers))

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    """The error JSON; a message that echoes input never carries text UTF-8 cannot encode (lone surrogates)."""
    return {"error": {"code": code, "message": safe_text(message)}}


def safe_text(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Codes FastAPI/Starlette statuses map to when they are raised outside our handlers.
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    411: "length_required",
    408: "request_timeout",
    413: "body_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    431: "headers_too_large",
}
