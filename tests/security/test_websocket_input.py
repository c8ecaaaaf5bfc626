"""Hostile websocket input: each gets an error frame or a clean close, never a crash, and the server
stays unaffected (a fresh connection chats normally afterwards, and nothing bad was stored).

Binary frames, JSON that is not an object, lone surrogates: error frames, socket still usable.
A frame over the size limit: close 1009. Invalid UTF-8 in a text frame: close 1007. Frames sent with a
handshake that fails auth: an HTTP 401, and none of them read. A flood of cancels: silence, then normal turns.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from model.tokenizer import ChatTokenizer
from tests.support import (
    LiveServerFactory,
    client_frame,
    endless_params,
    frame,
    handshake_request,
    open_ws,
    quiet_params,
    raw_connection,
    read_until_closed,
    send,
)

KEY = {"Authorization": "Bearer ws-key"}
MAX_TOKENS = 4000
CANCELS = 2000


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(api_keys=["ws-key"], max_new_tokens=MAX_TOKENS, rate_limit_per_minute=0) as live:
        yield live.url


@pytest.fixture
def session_id(base_url: str) -> str:
    return httpx.post(f"{base_url}/v1/sessions", headers=KEY).json()["session_id"]


def messages(base_url: str, session_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{base_url}/v1/sessions/{session_id}", headers=KEY).json()["messages"]


def good_turn(ws: ClientConnection) -> dict[str, Any]:
    send(ws, type="message", content="Are you still fine?", **quiet_params())
    while (event := frame(ws))["type"] in ("start", "token"):
        pass
    assert event["type"] == "done", event
    return event


def closed_with(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def server_unaffected(base_url: str) -> None:
    fresh = httpx.post(f"{base_url}/v1/sessions", headers=KEY).json()["session_id"]
    with open_ws(base_url, fresh, KEY) as ws:
        good_turn(ws)
    assert httpx.get(f"{base_url}/admin/ready").status_code == 200


def test_malformed_frames_get_error_frames_and_store_nothing(base_url: str, session_id: str) -> None:
    bad: list[str | bytes] = [
        b'{"type": "message", "content": "sent as binary"}',
        b"\x00\xff\xfe binary junk",
        "[]",
        "null",
        "42",
        '"message"',
        json.dumps({"type": "message", "content": None}),
        json.dumps({"type": "message", "content": ["a list"]}),
        '{"type": "message", "content": "lone \\ud800 surrogate"}',
        '{"type": "message", "content": "x", "type": "cancel", "extra": 1}',
        "[" * 4000 + "]" * 4000,  # nesting far past any parser recursion limit, under the size limit
        json.dumps({"type": "message", "content": "hi", "logit_bias": {"-1": 5}}),
    ]
    with open_ws(base_url, session_id, KEY) as ws:
        for raw in bad:
            ws.send(raw)
            error = frame(ws)
            assert error["type"] == "error" and error["error"]["code"] == "invalid_request", (raw, error)
        assert messages(base_url, session_id) == []
        good_turn(ws)  # the same socket still works
    assert len(messages(base_url, session_id)) == 2


def test_an_oversized_frame_closes_1009(base_url: str, session_id: str) -> None:
    ten_megabytes = json.dumps({"type": "message", "content": "x" * 10_000_000})
    with open_ws(base_url, session_id, KEY) as ws:
        with contextlib.suppress(ConnectionClosed):  # the server may close before the last byte is sent
            ws.send(ten_megabytes)
        assert closed_with(ws) == 1009
    assert messages(base_url, session_id) == []
    server_unaffected(base_url)


def test_invalid_utf8_in_a_text_frame_closes_1007(base_url: str, session_id: str) -> None:
    with open_ws(base_url, session_id, KEY) as ws:
        ws.send(b'{"type": "message", "content": "\xff\xfe"}', text=True)  # a text frame, not UTF-8
        assert closed_with(ws) == 1007
    assert messages(base_url, session_id) == []
    server_unaffected(base_url)


def test_frames_sent_with_a_refused_handshake_are_never_read(base_url: str, session_id: str) -> None:
    """The handshake and 20 message frames in one write, before the server can answer: it answers 401
    (no 101, so the frames are never parsed as frames), closes, and nothing was acted on."""
    message = json.dumps({"type": "message", "content": "let me in", **quiet_params()}).encode()
    for headers in (None, {"Authorization": "Bearer wrong-key"}):
        with raw_connection(base_url) as sock:
            path = f"/v1/sessions/{session_id}/stream"
            sock.sendall(handshake_request(base_url, path, headers) + client_frame(1, message) * 20)
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 401 ") and b" 101 " not in answer
        assert answer.count(b"HTTP/1.1") == 1  # one answer, to the handshake; the frames got none
    assert messages(base_url, session_id) == []
    server_unaffected(base_url)


def test_a_flood_of_cancels_is_harmless(base_url: str, session_id: str, tokenizer: ChatTokenizer) -> None:
    with open_ws(base_url, session_id, KEY) as ws:
        for _ in range(CANCELS):  # idle: nothing to cancel, and no answer
            send(ws, type="cancel")
        send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
        assert frame(ws)["type"] == "start"  # the first frame after the flood: the cancels were silent
        for _ in range(CANCELS):  # and during a reply: the first one stops it
            send(ws, type="cancel")
        while (event := frame(ws))["type"] == "token":
            pass
        assert event["type"] == "done" and event["message"]["finish_reason"] == "cancelled"
        good_turn(ws)
    stored = messages(base_url, session_id)
    assert len(stored) == 4 and stored[1]["finish_reason"] == "cancelled"
    server_unaffected(base_url)
