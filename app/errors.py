"""Typed service errors and the one place that turns any error into `{"error": {"code", "message"}}`.

Routes and services raise these; they never build error responses themselves, so every 4xx/5xx has the
same shape and the same status for the same condition.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error a client may see; `status` and `code` are what it gets."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(
        self, message: str = "missing or invalid API key: send 'Authorization: Bearer <key>'"
    ) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class SessionNotFound(ServiceError):
    """Also what another key's session looks like: no existence oracle."""

    status, code = 404, "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r} for this API key: create one with POST /v1/sessions")


class SessionBusy(ServiceError):
    status, code = 409, "session_busy"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is already generating a reply: wait for it to finish (or cancel it) "
            "and send the next message then"
        )


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class StoreUnavailable(ServiceError):
    status, code = 503, "store_unavailable"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class EngineUnavailable(ServiceError):
    """The engine thread is not running (shutting down, or it died): readiness reports it too."""

    status, code = 503, "model_unavailable"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "the model is not running on this server: retry shortly",
            headers={"Retry-After": str(retry_after)},
        )


class EngineFailed(ServiceError):
    """The model raised while generating; the turn is not stored."""

    status, code = 500, "generation_failed"


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _validation_message(exc: RequestValidationError) -> str:
    """One readable line per problem, e.g. `body.temperature: Input should be >= 0`."""
    parts = []
    for problem in exc.errors():
        location = ".".join(str(p) for p in problem.get("loc", ()))
        parts.append(
            f"{location}: {problem.get('msg', 'invalid')}" if location else problem.get("msg", "invalid")
        )
    return "; ".join(parts) or "invalid request"


async def _service_error_handler(_: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body("invalid_request", _validation_message(exc)), status_code=422)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def _http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error_handler(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body("internal_error", "internal server error; see the server log"), status_code=500
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error a request can raise through the one JSON error shape."""
    # Starlette types handlers as taking Exception; each is only ever called with its registered type.
    app.add_exception_handler(ServiceError, _service_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error_handler)
