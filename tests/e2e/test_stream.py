"""Websocket end to end: frames, exact streamed text, cancel, disconnect, bad frames, refused handshakes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from model.tokenizer import ChatTokenizer
from tests import support
from tests.support import (
    LiveServerFactory,
    endless_params,
    frame,
    open_ws,
    quiet_params,
    send,
)

KEY = "stream-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 4000  # endless replies run until the test cancels them


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(api_keys=[KEY, "other-key"], max_new_tokens=MAX_TOKENS) as live:
        yield live.url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=None) as client:
        yield client


def run_turn(ws: ClientConnection, **fields: Any) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Send a message; return (start frame, token texts, done frame)."""
    send(ws, type="message", **fields)
    start = frame(ws)
    assert start["type"] == "start", start
    texts = []
    while (event := frame(ws))["type"] == "token":
        texts.append(event["text"])
    assert event["type"] == "done", event
    return start, texts, event


def stored_messages(http: httpx.Client, session_id: str, count: int) -> list[dict[str, Any]]:
    """The session's messages once there are `count` of them (a cancelled turn is stored just after)."""
    return support.stored_messages(str(http.base_url).rstrip("/"), session_id, count, dict(http.headers))


def test_streamed_tokens_concatenate_to_the_stored_reply(base_url: str, http: httpx.Client) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, AUTH) as ws:
        start, texts, done = run_turn(ws, content="Hello, stream!", **quiet_params(max_tokens=16))
        assert start["session_id"] == session_id and start["prompt_tokens"] > 0
        assert all(texts)  # no empty token frames
        assert done["message"]["role"] == "assistant"
        assert "".join(texts) == done["message"]["content"]
        assert done["usage"]["completion_tokens"] <= 16
        # Several turns per connection.
        _, texts2, done2 = run_turn(ws, content="Again.", **quiet_params(max_tokens=16))
        assert done2["usage"]["context_tokens"] > done["usage"]["context_tokens"]
    messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert [m["content"] for m in messages] == ["Hello, stream!", "".join(texts), "Again.", "".join(texts2)]


def test_multibyte_characters_are_never_split(
    base_url: str, http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    """Push the reply into raw UTF-8 byte pieces (the two bytes of "é", C3 A9): a frame boundary inside a
    character would show up as U+FFFD in the frames but "é" in the stored reply."""
    bytes_of_e = [tokenizer._sp.piece_to_id(f"<0x{b:02X}>") for b in "é".encode()]
    bias = {str(i): 100 for i in bytes_of_e}
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, AUTH) as ws:
        sampling = {
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "seed": 5,
            "max_tokens": 40,
            "logit_bias": bias,
        }
        _, texts, done = run_turn(ws, content="é?", **sampling)
    stored = stored_messages(http, session_id, 2)[1]["content"]
    assert "é" in stored
    assert "".join(texts) == done["message"]["content"] == stored


def test_cancel_stops_the_reply_and_stores_it_as_cancelled(
    base_url: str, http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, AUTH) as ws:
        send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
        assert frame(ws)["type"] == "start"
        texts = [frame(ws)["text"] for _ in range(3)]
        send(ws, type="cancel")
        while (event := frame(ws))["type"] == "token":
            texts.append(event["text"])
        assert event["type"] == "done"
        assert event["message"]["finish_reason"] == "cancelled"
        assert 3 <= event["usage"]["completion_tokens"] < MAX_TOKENS
        assert "".join(texts) == event["message"]["content"]
        # The socket is still good for another turn.
        _, _, done = run_turn(ws, content="Short now.", **quiet_params())
        assert done["message"]["finish_reason"] in ("stop", "length")
    messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert messages[1]["finish_reason"] == "cancelled" and messages[1]["content"] == "".join(texts)


def test_a_cancel_sent_right_after_the_message_is_not_lost(
    base_url: str, http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    """The cancel may arrive while the turn is still taking its lock: it must still stop the reply."""
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, AUTH) as ws:
        send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
        send(ws, type="cancel")
        while (event := frame(ws))["type"] in ("start", "token"):
            pass
        assert event["type"] == "done", event
        assert event["message"]["finish_reason"] == "cancelled"
        assert event["usage"]["completion_tokens"] < MAX_TOKENS


def test_disconnect_stops_the_reply_and_releases_the_session(
    base_url: str, http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, AUTH) as ws:
        send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
        assert frame(ws)["type"] == "start"
        assert frame(ws)["type"] == "token"
    reply = stored_messages(http, session_id, 2)[1]
    assert reply["finish_reason"] == "cancelled"
    turn = http.post(
        f"/v1/sessions/{session_id}/messages", json={"content": "still there?", **quiet_params()}
    )
    assert turn.status_code == 200


def test_bad_frames_get_error_frames_and_the_socket_stays_usable(base_url: str, http: httpx.Client) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    bad = [
        "not json",
        json.dumps({"type": "shout", "content": "hi"}),
        json.dumps({"type": "message"}),
        json.dumps({"type": "message", "content": "   "}),
        json.dumps({"type": "message", "content": "hi", "temperature": -1}),
        json.dumps({"type": "message", "content": "hi", "max_tokens": MAX_TOKENS + 1}),
    ]
    with open_ws(base_url, session_id, AUTH) as ws:
        for raw in bad:
            ws.send(raw)
            error = frame(ws)
            assert error["type"] == "error" and error["error"]["code"] == "invalid_request", error
            assert error["error"]["message"]
        _, _, done = run_turn(ws, content="Now a good one.", **quiet_params())
        assert done["type"] == "done"
    assert len(http.get(f"/v1/sessions/{session_id}").json()["messages"]) == 2


def test_a_message_during_a_reply_is_refused_as_busy(
    base_url: str, http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, AUTH) as ws:
        send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
        assert frame(ws)["type"] == "start"
        send(ws, type="message", content="Interrupting!")
        while (event := frame(ws))["type"] == "token":
            pass
        assert event["type"] == "error" and event["error"]["code"] == "session_busy"
        send(ws, type="cancel")
        while (event := frame(ws))["type"] == "token":
            pass
        assert event["type"] == "done"
    messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Talk forever."]


def test_auth_by_header_or_query_and_failures_are_refused_in_the_handshake(
    base_url: str, http: httpx.Client
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    with open_ws(base_url, session_id, headers=None, query=f"?api_key={KEY}") as ws:
        _, _, done = run_turn(ws, content="Browser here.", **quiet_params())
        assert done["type"] == "done"
    for headers, query in [(None, ""), ({"Authorization": "Bearer wrong"}, ""), (None, "?api_key=wrong")]:
        with pytest.raises(InvalidStatus) as refused:
            open_ws(base_url, session_id, headers=headers, query=query)
        response = refused.value.response
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(response.body)["error"]["code"] == "unauthorized"
    # Another key's session: 404, exactly as for a session that does not exist.
    for sid, headers in [(session_id, {"Authorization": "Bearer other-key"}), ("Q" * len(session_id), AUTH)]:
        with pytest.raises(InvalidStatus) as refused:
            open_ws(base_url, sid, headers=headers)
        assert refused.value.response.status_code == 404
        assert json.loads(refused.value.response.body)["error"]["code"] == "session_not_found"
