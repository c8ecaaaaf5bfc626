"""Slow and silent clients, over real sockets against a real server: what they can hold is bounded.

- A websocket client that floods pings and never reads the pongs grows the server's memory by a bounded
  amount (the server stops reading from it), and is disconnected after SEND_TIMEOUT_SECONDS.
- A websocket client that starts a turn and then reads nothing loses its turn (stored as cancelled) and
  the session's lock, so the session serves other requests again.
- An HTTP client that stops reading a response is disconnected the same way; one that sends half a
  request header is closed after HEADER_TIMEOUT_SECONDS; an oversized header is a 400; connections
  beyond MAX_CONNECTIONS get 503.

The deadlines below are generous multiples of the settings: they bound how long a broken server makes
the test wait, and are never what the test measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from app.cli import bound_url
from app.config import Settings
from app.protocols import uvicorn_config
from model.tokenizer import ChatTokenizer
from tests.support import (
    client_frame,
    endless_params,
    handshake_request,
    make_settings,
    require_redis,
    serving,
)

KEY = "slow-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEND_TIMEOUT = 1.0
HEADER_TIMEOUT = 1.0
PATIENCE = 60.0  # seconds a broken server may keep the test waiting before it fails
FLOOD_BYTES = 32 * 1024 * 1024
PING = client_frame(9, b"p" * 125)  # the largest control frame: 131 bytes on the wire


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint: Path) -> Iterator[str]:
    require_redis()
    settings = make_settings(
        tiny_checkpoint,
        api_keys=[KEY],
        max_new_tokens=4000,
        rate_limit_per_minute=0,  # the lock test polls
        send_timeout_seconds=SEND_TIMEOUT,
        header_timeout_seconds=HEADER_TIMEOUT,
    )
    with serving(settings) as url:
        yield url


def silent_socket(base_url: str) -> socket.socket:
    """A connected socket with a tiny receive buffer, so what the server sends it backs up quickly."""
    host, port = base_url.split("://", 1)[1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    return sock


def open_silent_ws(base_url: str, session_id: str) -> socket.socket:
    """A raw websocket past its handshake (101 read), which from then on reads nothing."""
    sock = silent_socket(base_url)
    sock.sendall(handshake_request(base_url, f"/v1/sessions/{session_id}/stream", AUTH))
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    return sock


class Flood(threading.Thread):
    """Sends pings until FLOOD_BYTES are out or the server drops the connection; never reads."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.sent = 0
        self.dropped = False

    def run(self) -> None:
        burst = PING * 500
        try:
            while self.sent < FLOOD_BYTES:
                self.sock.sendall(burst)
                self.sent += len(burst)
        except OSError:
            self.dropped = True


def new_session(base_url: str) -> str:
    return httpx.post(f"{base_url}/v1/sessions", headers=AUTH).json()["session_id"]


def test_a_ping_flood_without_reading_grows_memory_by_little_and_is_dropped(base_url: str) -> None:
    process = psutil.Process()  # the server runs in this process (a thread), as does the client
    with open_silent_ws(base_url, new_session(base_url)) as sock:
        before = process.memory_info().rss
        flood = Flood(sock)
        flood.start()
        peak = before
        while flood.is_alive():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)
        peak = max(peak, process.memory_info().rss)
    growth = (peak - before) / 2**20
    # Unbounded, the pongs of 32 MiB of pings queue up in the server: about +28 MiB. Bounded, the server
    # stops reading once its write buffer is full, and drops the client after SEND_TIMEOUT_SECONDS.
    assert flood.dropped, f"the server read all {flood.sent} bytes of pings from a client that never read"
    assert growth < 4, f"the server grew by {growth:.1f} MiB during the flood"


def test_a_websocket_client_that_never_reads_loses_its_turn_and_lock(
    base_url: str, tokenizer: ChatTokenizer
) -> None:
    session_id = new_session(base_url)
    message = {"type": "message", "content": "Talk forever.", **endless_params(tokenizer, 4000)}
    with open_silent_ws(base_url, session_id) as sock:
        sock.sendall(client_frame(1, json.dumps(message).encode()))
        flood = Flood(sock)  # and keep the server's answers (pongs) coming, without reading any
        flood.start()
        with httpx.Client(base_url=base_url, headers=AUTH) as http:
            deadline = time.monotonic() + PATIENCE
            # The session takes a new turn again (409 while the silent client holds the lock).
            while (
                turn := http.post(
                    f"/v1/sessions/{session_id}/messages",
                    json={"content": "Anyone there?", "temperature": 0, "max_tokens": 4},
                )
            ).status_code == 409:
                assert time.monotonic() < deadline, "the silent client still holds its turn"
                time.sleep(0.1)
            assert turn.status_code == 200, turn.text
            messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
        # The silent client's turn was stored, as cancelled, before the new one.
        assert [m["content"] for m in messages[::2]] == ["Talk forever.", "Anyone there?"]
        assert messages[1]["finish_reason"] == "cancelled"
        flood.join()
        assert flood.dropped


# ---- HTTP, against a bare app: the bounds belong to the server's protocols, not to one route ----------


@contextmanager
def bare_server(settings: Settings, app: ASGIApp) -> Iterator[str]:
    server = uvicorn.Server(uvicorn_config(settings, app, "127.0.0.1", 0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    try:
        yield bound_url(server, "127.0.0.1")
    finally:
        server.should_exit = True
        thread.join()


def bare_settings(tiny_checkpoint: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "send_timeout_seconds": SEND_TIMEOUT,
        "header_timeout_seconds": HEADER_TIMEOUT,
        **overrides,
    }
    return make_settings(tiny_checkpoint, **values)


class EndlessStream:
    """An ASGI app streaming 1 MiB chunks until it is told that its client left."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 2**20
        try:
            while not gone.is_set():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.sent += len(chunk)
        finally:
            watcher.cancel()
            self.ended.set()


def test_an_http_client_that_stops_reading_is_dropped(tiny_checkpoint: Path) -> None:
    app = EndlessStream()
    with bare_server(bare_settings(tiny_checkpoint), app) as url, silent_socket(url) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")
        assert app.ended.wait(PATIENCE), "the server still writes to a client that reads nothing"
        sent = app.sent
        sock.settimeout(PATIENCE)
        with contextlib.suppress(ConnectionResetError):  # closed (or reset): what it had sent, then the end
            while sock.recv(2**20):
                pass
    assert sent < 64 * 2**20  # it stopped at the first chunks that did not drain, not after the 2 GiB


def test_half_a_request_header_is_closed_after_the_header_timeout(tiny_checkpoint: Path) -> None:
    with bare_server(bare_settings(tiny_checkpoint), EndlessStream()) as url:
        for opening in (b"", b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: "):
            with silent_socket(url) as sock:
                sock.sendall(opening)
                sock.settimeout(PATIENCE)
                with contextlib.suppress(ConnectionResetError):  # aborted: closed too
                    assert sock.recv(1024) == b""  # closed, with no answer


def test_an_oversized_header_is_400(tiny_checkpoint: Path) -> None:
    with bare_server(bare_settings(tiny_checkpoint), EndlessStream()) as url, silent_socket(url) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        sock.settimeout(PATIENCE)
        assert sock.recv(1024).startswith(b"HTTP/1.1 400 ")


def test_connections_beyond_the_cap_get_503(tiny_checkpoint: Path) -> None:
    with bare_server(bare_settings(tiny_checkpoint, max_connections=3), EndlessStream()) as url:
        idle = [silent_socket(url) for _ in range(3)]
        try:
            time.sleep(0.2)  # let the server register them
            with silent_socket(url) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                sock.settimeout(PATIENCE)
                assert sock.recv(1024).startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in idle:
                sock.close()
