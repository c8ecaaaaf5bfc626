"""Request body size limit, as plain ASGI middleware so it sees the body before anything parses it.

A Content-Length over the limit is refused at once; a chunked body is counted as it arrives and refused
when it crosses the limit. Either way the client gets a 413 and nothing is parsed: in OpenAI's error shape
on the OpenAI-compatible routes (their SDKs parse it), in ours everywhere else.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body
from app.openai.errors import openai_error_body

# Paths served by the OpenAI-compatible router (app/openai/router.py).
OPENAI_PATHS = ("/v1/chat/", "/v1/models")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body is over this server's limit of {self.max_bytes} bytes: send a shorter message"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, send)
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside FastAPI's body reading, which re-raises HTTPExceptions as they are.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        if str(scope.get("path", "")).startswith(OPENAI_PATHS):
            shape = openai_error_body(self._message(), "invalid_request_error", None, "payload_too_large")
        else:
            shape = error_body("payload_too_large", self._message())
        body = json.dumps(shape).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
