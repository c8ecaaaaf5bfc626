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
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

ANY_ORIGIN = "*"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Query parameters that carry a credential, in a logged path such as /v1/sessions/x/stream?api_key=...
_QUERY_SECRET = re.compile(r"([?&](?:api_key|access_token|token)=)[^&\s\"']*", re.IGNORECASE)
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


def _redact(value: object) -> object:
    return _QUERY_SECRET.sub(r"\1[redacted]", value) if isinstance(value, str) else value


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
