"""OpenAI's error shape for the OpenAI-compatible routes: `{"error": {"message", "type", "param", "code"}}`.

The rest of the service answers `{"error": {"code", "message"}}` (app/errors.py). OpenAI clients and
SDKs read `message`, `type` and `param`, and use status codes the way OpenAI does: an invalid request is a
400 (not our 422). So the OpenAI routes use `OpenAIRoute`, which catches every error their handlers and
dependencies raise (auth, body validation, service errors) and answers in OpenAI's shape, keeping our
specific `code` (session_busy, overloaded, ...) and any Retry-After header.

`type` follows the status: 401 and the other 4xx are "invalid_request_error" (as OpenAI answers a bad key),
429 is "rate_limit_error", 5xx is "server_error".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from app.errors import InvalidRequest, ServiceError, Unauthorized

logger = logging.getLogger(__name__)


class OpenAIInvalidRequest(InvalidRequest):
    """A request OpenAI would accept but this server cannot serve (n > 1, tools, ...): a 400 naming the
    offending field in `param`, so a client sees which of its settings to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(OpenAIInvalidRequest):
    """A stateless prompt over MAX_PROMPT_TOKENS: OpenAI's 400 `context_length_exceeded`."""

    code = "context_length_exceeded"

    def __init__(self, tokens: int, limit: int, param: str = "messages") -> None:
        super().__init__(
            f"the prompt is {tokens} tokens long, more than this server's MAX_PROMPT_TOKENS={limit}: "
            "send fewer or shorter messages, or keep the conversation stored on the server (a session, or "
            "store=true), where only the new message is fed",
            param=param,
        )


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(
            f"The model {requested!r} does not exist on this server: it serves {served!r} "
            f"(see GET /v1/models); send model={served!r}"
        )
        self.param = "model"


def openai_error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _param_path(location: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`, the way OpenAI names a field."""
    parts = [p for p in location if p != "body"]
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    messages = []
    for problem in problems:
        where = _param_path(tuple(problem.get("loc", ())))
        messages.append(
            f"{where}: {problem.get('msg', 'invalid')}" if where else problem.get("msg", "invalid")
        )
    param = _param_path(tuple(problems[0].get("loc", ()))) if problems else None
    body = openai_error_body("; ".join(messages) or "invalid request", "invalid_request_error", param, None)
    return JSONResponse(body, status_code=400)


def openai_error_response(exc: Exception) -> JSONResponse:
    """Any error an OpenAI route can raise, as OpenAI's JSON error with OpenAI's status code."""
    if isinstance(exc, RequestValidationError):
        return _validation_response(exc)
    if isinstance(exc, ServiceError):
        status = 400 if exc.status == 422 else exc.status
        code = "invalid_api_key" if isinstance(exc, Unauthorized) else exc.code
        body = openai_error_body(exc.message, _error_type(status), getattr(exc, "param", None), code)
        return JSONResponse(body, status_code=status, headers=exc.headers)
    if isinstance(exc, StarletteHTTPException):  # e.g. the body-size limit while the body is read
        http_code = "payload_too_large" if exc.status_code == 413 else None
        body = openai_error_body(str(exc.detail), _error_type(exc.status_code), None, http_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    logger.exception("unhandled error in an OpenAI route", exc_info=exc)
    body = openai_error_body("internal server error; see the server log", "server_error", None, None)
    return JSONResponse(body, status_code=500)


class OpenAIRoute(APIRoute):
    """An APIRoute whose errors, from dependencies and body validation included, use OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return openai_error_response(exc)

        return handle
