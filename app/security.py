"""Browser-facing origin policy: CORS for the HTTP API and the Origin allow-list of the websocket.

Both defend the same thing: a page on another site, running in a user's browser, must not drive this
API with whatever the browser can reach. CORS is closed unless CORS_ALLOW_ORIGINS lists origins: with
no CORS headers a browser neither lets a foreign page read a response nor sends it the preflighted
requests (JSON bodies, an Authorization header) at all. Websockets have no CORS, so the handshake's
`Origin` header is checked instead: the server's own origin and WS_ALLOWED_ORIGINS pass, anything else
is refused before the socket is accepted (HTTP 403). A handshake without `Origin` is not from a browser
page (browsers always send one), so it is let through to the API-key check like any other client.

Browsers cannot set headers on a websocket, so the chat page sends its key as `?api_key=`; uvicorn logs
every handshake's path with its query at INFO, so its log records are redacted before they are written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from urllib.parse import unquote_plus, urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ANY_ORIGIN = "*"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Query parameters that carry a credential, in a logged path such as /v1/sessions/x/stream?api_key=...,
# matched on the name as the server reads it (percent-decoded, `+` as a space) in any letter case, so
# `?api%5Fkey=` or `?API_KEY=` is redacted too.
_SECRET_NAMES = frozenset({"api_key", "access_token", "token"})
_QUERY_PAIR = re.compile(r"([?&;])([^=&;?\s\"']*)=([^&;\s\"']*)")
# The loggers uvicorn writes request paths to: handshakes and errors, and the access log.
_SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access")


def normalize_origin(raw: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin` (lower case, no default port, no path), or
    `*`; ValueError, naming the expected form, for anything else."""
    text = raw.strip()
    if text == ANY_ORIGIN:
        return ANY_ORIGIN
    problem = (
        f"origin {raw!r} is not of the form scheme://host[:port] (e.g. https://chat.example.com) or '*': "
        "fix CORS_ALLOW_ORIGINS / WS_ALLOWED_ORIGINS"
    )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(problem) from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(problem)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(problem)
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def websocket_origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a websocket handshake with this `Origin` (and `Host`) may proceed.

    Same-origin pages (the chat page served at `/`) always may; other origins only when listed.
    """
    if origin is None:
        return True
    if ANY_ORIGIN in allowed:
        return True
    try:
        presented = normalize_origin(origin)
    except ValueError:  # "null" (sandboxed frames, file:// pages) or garbage
        return False
    if presented in allowed:
        return True
    if not host:
        return False
    scheme = presented.split("://", 1)[0]
    try:
        return presented == normalize_origin(f"{scheme}://{host}")
    except ValueError:
        return False


def install_cors(app: FastAPI, origins: Sequence[str]) -> None:
    """Open CORS to the listed origins only; with none listed, add nothing (CORS stays closed)."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        # Bearer keys, never cookies: a browser must not attach ambient credentials for a foreign page.
        allow_credentials=False,
        expose_headers=["Retry-After"],
        max_age=600,
    )


# The chat page's policy: its own script and styles only (it has no inline script or style), its API and
# websocket on the same origin, never framed (clickjacking), no Referer leaving it (a session id in a URL).
PAGE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)
PAGE_PATHS = ("/static/",)


class PageSecurityHeaders:
    """Adds PAGE_HEADERS to the chat page (`/`) and its static files; the API's JSON needs none, and
    /docs (development) loads its viewer from a CDN, which the page's policy would block."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/" or path.startswith(PAGE_PATHS)):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *PAGE_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _decoded_name(raw: str) -> str:
    """A query parameter's name as a server would read it, however many times it was percent-encoded."""
    name = raw
    for _ in range(4):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower()


def _redact_pair(match: re.Match[str]) -> str:
    separator, name, _ = match.groups()
    if _decoded_name(name) in _SECRET_NAMES:
        return f"{separator}{name}=[redacted]"
    return match.group(0)


def _redact(value: object) -> object:
    return _QUERY_PAIR.sub(_redact_pair, value) if isinstance(value, str) else value


class RedactQuerySecrets(logging.Filter):
    """Replaces credentials in query strings of a record's message and arguments with `[redacted]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) for arg in record.args)
        return True


def redact_secrets_in_server_logs() -> None:
    """Install RedactQuerySecrets on uvicorn's loggers (once, however many apps a process builds).

    On the loggers themselves, not on handlers: uvicorn replaces its handlers when it configures
    logging, and a filter on a logger sees exactly the records logged to it.
    """
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactQuerySecrets) for existing in logger.filters):
            logger.addFilter(RedactQuerySecrets())
