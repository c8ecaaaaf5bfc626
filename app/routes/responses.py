"""The error responses each router can give, for the OpenAPI schema.

Every 4xx/5xx is `{"error": {"code", "message"}}` (app/errors.py), or OpenAI's error shape on the
OpenAI-compatible routes (app/openai/errors.py); declaring that per status lets a client generator, and
the schema fuzz test (tests/fuzz), hold the server to it. It also replaces FastAPI's default 422 schema
(`{"detail": [...]}`), which this service never sends.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}

_DESCRIPTIONS = {
    400: "The body could not be read as JSON text, e.g. it is not UTF-8 (`http_error`); on the OpenAI "
    "routes, any invalid request (`invalid_request_error`).",
    401: "Missing or invalid credentials (`unauthorized`).",
    404: "No such session for this API key (`session_not_found`; another key's session looks the same), "
    "or no such model (`model_not_found`).",
    409: "The session is already generating a reply (`session_busy`), or the key holds as many sessions or "
    "stored bytes as it may (`quota_exceeded`).",
    413: "The request body is over the server's limit (`payload_too_large`).",
    422: "The request is malformed or out of range (`invalid_request`); nothing was stored.",
    429: "Over the key's rate limit (`rate_limited`), or the key's share of the server or the server's queue "
    "is full (`overloaded`).",
    500: "The model failed while generating (`generation_failed`); the turn was not stored.",
    503: "Redis or the model is unavailable (`store_unavailable`, `model_unavailable`, `not_ready`).",
}


def error_responses(*statuses: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these statuses, each with the error shape."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": model, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


SESSION_ERRORS = error_responses(400, 401, 404, 409, 413, 422, 429, 503)
CHAT_ERRORS = error_responses(400, 401, 404, 409, 413, 422, 429, 500, 503)
ADMIN_ERRORS = error_responses(401, 413, 503)
OPENAI_ERRORS = error_responses(400, 401, 404, 409, 413, 429, 500, 503, model=OpenAIErrorBody)
