"""A client that disconnects mid-stream (websocket, or SSE on the OpenAI route) cancels its generation.

The engine checks for cancellation before every decode step (tests/model/test_generate.py proves the
one-step bound on `generate`); here, end to end: the metrics count the cancellation, the cut-off reply is
stored as "cancelled" with what was generated, and a conversation streaming beside it on the same engine
goes on undisturbed, with exactly the text it gets when it runs alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.tokenizer import ChatTokenizer
from tests.support import (
    RedisServer,
    endless_params,
    frame,
    make_settings,
    metric,
    open_ws,
    running_server,
    send,
    stored_messages,
)

MAX_TOKENS = 4000
ADMIN = {"Authorization": "Bearer admin"}
CANCELLED = 'reformer_chat_request_success_total{finished_reason="cancelled"}'
NEIGHBOUR = "Tell me about your weekend."


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis"), aof=False) as redis_server:
        settings = make_settings(
            tiny_checkpoint,
            redis_url=redis_server.url,
            max_new_tokens=MAX_TOKENS,
            max_running_requests=4,
            admin_token="admin",
            rate_limit_per_minute=0,
        )
        with running_server(settings) as url:
            yield url


def counter(url: str, series: str) -> float:
    return metric(url, series, ADMIN, default=0.0)


def neighbour_reply(url: str, tokenizer: ChatTokenizer) -> str:
    """The greedy reply the neighbour conversation gets alone, for comparison."""
    session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
    body = {"content": NEIGHBOUR, **endless_params(tokenizer, 32)}
    reply = httpx.post(f"{url}/v1/sessions/{session_id}/messages", json=body, timeout=None)
    assert reply.status_code == 200, reply.text
    return reply.json()["message"]["content"]


def stored_reply(url: str, session_id: str) -> dict[str, Any]:
    """The session's reply once stored (a cancelled turn is stored just after the engine stops)."""
    return stored_messages(url, session_id, 2)[1]


def test_websocket_disconnect_cancels_and_the_neighbour_streams_on(
    server: str, tokenizer: ChatTokenizer
) -> None:
    expected = neighbour_reply(server, tokenizer)
    cancelled_before = counter(server, CANCELLED)
    leaving = httpx.post(f"{server}/v1/sessions").json()["session_id"]
    staying = httpx.post(f"{server}/v1/sessions").json()["session_id"]
    with open_ws(server, staying) as neighbour, open_ws(server, leaving) as ws:
        send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
        assert frame(ws)["type"] == "start"
        seen = "".join(frame(ws)["text"] for _ in range(3))
        send(neighbour, type="message", content=NEIGHBOUR, **endless_params(tokenizer, 32))
        assert frame(neighbour)["type"] == "start"
        texts = [frame(neighbour)["text"]]  # both are generating now; then the first client leaves
        # Gone without a close handshake, as a dropped connection or a killed tab is. (A polite close
        # could not complete anyway: the unread tokens are queued before the server's close frame.)
        ws.close_socket()
        while (event := frame(neighbour))["type"] == "token":
            texts.append(event["text"])
        assert event["type"] == "done", event
    assert "".join(texts) == event["message"]["content"] == expected
    assert event["message"]["finish_reason"] == "length"

    reply = stored_reply(server, leaving)
    assert reply["finish_reason"] == "cancelled" and reply["content"].startswith(seen)
    assert counter(server, CANCELLED) - cancelled_before == 1


def test_sse_disconnect_cancels_and_the_neighbour_streams_on(server: str, tokenizer: ChatTokenizer) -> None:
    expected = neighbour_reply(server, tokenizer)
    model = httpx.get(f"{server}/v1/models").json()["data"][0]["id"]
    cancelled_before = counter(server, CANCELLED)
    leaving = httpx.post(f"{server}/v1/sessions").json()["session_id"]
    staying = httpx.post(f"{server}/v1/sessions").json()["session_id"]
    endless = endless_params(tokenizer, MAX_TOKENS)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Talk forever."}],
        "stream": True,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "logit_bias": endless["logit_bias"],
    }
    with (
        httpx.Client(base_url=server, timeout=None) as http,
        open_ws(server, staying) as neighbour,
    ):
        with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": leaving}
        ) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            deltas = []
            while len(deltas) < 3:
                line = next(events)
                if line.startswith("data: "):
                    deltas.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
            send(neighbour, type="message", content=NEIGHBOUR, **endless_params(tokenizer, 32))
            assert frame(neighbour)["type"] == "start"
            texts = [frame(neighbour)["text"]]
        # Leaving the block closed the connection mid-stream.
        while (event := frame(neighbour))["type"] == "token":
            texts.append(event["text"])
        assert event["type"] == "done", event
    assert "".join(texts) == expected

    reply = stored_reply(server, leaving)
    assert reply["finish_reason"] == "cancelled" and reply["content"].startswith("".join(deltas))
    assert counter(server, CANCELLED) - cancelled_before == 1
