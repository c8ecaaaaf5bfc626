"""Browser origins: CORS is closed unless configured, and the websocket refuses foreign pages.

A page on another site runs in the user's browser, next to whatever the browser can reach. Without CORS
headers the browser neither shows it our responses nor sends our preflighted requests (JSON bodies, an
Authorization header); websockets have no CORS, so their handshake's Origin is checked by the server.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from websockets.exceptions import InvalidStatus

from app.config import Settings
from app.security import normalize_origin, websocket_origin_allowed
from tests.support import (
    LiveServerFactory,
    frame,
    open_ws,
    quiet_params,
    send,
)

FRIEND = "https://chat.example.com"
STRANGER = "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


@pytest.fixture(scope="module")
def closed(live_server: LiveServerFactory) -> Iterator[str]:
    """A server with the defaults: no CORS origins, no extra websocket origins."""
    with live_server() as live:
        yield live.url


@pytest.fixture(scope="module")
def configured(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(cors_allow_origins=FRIEND, ws_allowed_origins=FRIEND) as live:
        yield live.url


def test_origins_are_normalised_as_browsers_send_them() -> None:
    assert normalize_origin(" HTTPS://Chat.Example.com:443/ ") == "https://chat.example.com"
    assert normalize_origin("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert normalize_origin("http://[::1]:80") == "http://[::1]"
    assert normalize_origin("*") == "*"
    for bad in ("chat.example.com", "ftp://x", "https://x/path", "https://x?q=1", "https://u@x", "null"):
        with pytest.raises(ValueError, match=r"scheme://host\[:port\]"):
            normalize_origin(bad)
    with pytest.raises(ValidationError, match="CORS_ALLOW_ORIGINS"):
        Settings(_env_file=None, cors_allow_origins="https://ok.example, not-an-origin")
    assert Settings(_env_file=None, ws_allowed_origins=f"{FRIEND}/, ").ws_allowed_origins == [FRIEND]


def test_websocket_origin_rules() -> None:
    host = "chat.example.com"
    assert websocket_origin_allowed(None, host, [])  # not a browser page
    assert websocket_origin_allowed(FRIEND, host, [])  # the server's own page
    assert websocket_origin_allowed("https://CHAT.example.com:443", "chat.example.com:443", [])
    assert not websocket_origin_allowed(STRANGER, host, [])
    assert not websocket_origin_allowed("null", host, [])  # sandboxed frames, file:// pages
    assert not websocket_origin_allowed("http://chat.example.com:8080", host, [])  # another port
    assert websocket_origin_allowed(STRANGER, host, [STRANGER])
    assert websocket_origin_allowed("null", host, ["*"])
    assert not websocket_origin_allowed(STRANGER, None, [])


def test_cors_is_closed_by_default(closed: str) -> None:
    preflight = httpx.options(f"{closed}/v1/sessions", headers={"Origin": STRANGER, **PREFLIGHT})
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.get(f"{closed}/admin/health", headers={"Origin": STRANGER})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_opens_only_to_the_configured_origins(configured: str) -> None:
    friend = httpx.options(f"{configured}/v1/sessions", headers={"Origin": FRIEND, **PREFLIGHT})
    assert friend.status_code == 200
    assert friend.headers["access-control-allow-origin"] == FRIEND
    assert "authorization" in friend.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in friend.headers  # bearer keys, never cookies
    created = httpx.post(f"{configured}/v1/sessions", headers={"Origin": FRIEND})
    assert created.status_code == 201 and created.headers["access-control-allow-origin"] == FRIEND

    stranger = httpx.options(f"{configured}/v1/sessions", headers={"Origin": STRANGER, **PREFLIGHT})
    assert stranger.status_code >= 400
    assert "access-control-allow-origin" not in stranger.headers


def chat_over_websocket(url: str, origin: str | None) -> dict:
    session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
    with open_ws(url, session_id, headers={"Origin": origin} if origin else None) as ws:
        send(ws, type="message", content="hello", **quiet_params())
        while (event := frame(ws))["type"] in ("start", "token"):
            pass
        return event


def test_the_websocket_refuses_foreign_pages(closed: str, configured: str) -> None:
    same_origin = closed  # http://127.0.0.1:<port>: what the chat page at / sends
    assert chat_over_websocket(closed, same_origin)["type"] == "done"
    assert chat_over_websocket(closed, None)["type"] == "done"  # a script or SDK, not a browser
    assert chat_over_websocket(configured, FRIEND)["type"] == "done"
    session_id = httpx.post(f"{closed}/v1/sessions").json()["session_id"]
    for url, origin in [(closed, STRANGER), (closed, FRIEND), (closed, "null"), (configured, STRANGER)]:
        with pytest.raises(InvalidStatus) as refused:
            open_ws(url, session_id, headers={"Origin": origin})
        assert refused.value.response.status_code == 403, origin
    assert httpx.get(f"{closed}/v1/sessions/{session_id}").json()["messages"] == []
