"""The OpenAI surface over plain HTTP: the exact SSE bytes, error shapes and status codes, and hang-ups
that cancel generation (streamed or not, stateless or on a session)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from model.tokenizer import ChatTokenizer
from tests.support import (
    TEST_REDIS_URL,
    LiveServerFactory,
    endless_params,
    metric,
    poll_until,
    stored_messages,
)

KEY = {"Authorization": "Bearer sse-key"}
MAX_TOKENS = 4000  # endless replies run until the test hangs up on them
GREEDY = {"temperature": 0, "max_tokens": 10}
HELLO = [{"role": "user", "content": "Hello!"}]
EVENT = re.compile(rb"data: (.*?)\n\n", re.DOTALL)


@pytest.fixture(scope="module")
def server(live_server: LiveServerFactory) -> Iterator[tuple[str, str]]:
    """(base URL, Redis key prefix)."""
    with live_server(api_keys=["sse-key"], max_new_tokens=MAX_TOKENS) as live:
        yield live.url, live.prefix


@pytest.fixture
def http(server: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], headers=KEY, timeout=None) as client:
        yield client


def body(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    model = http.get("/v1/models").json()["data"][0]["id"]
    return {"model": model, "messages": HELLO, **fields}


def events(raw: bytes) -> list[bytes]:
    """The data of each event; asserts the stream is nothing but `data: ...\\n\\n` events."""
    found = EVENT.findall(raw)
    assert b"".join(b"data: " + e + b"\n\n" for e in found) == raw, raw
    return found


def cancelled_count(http: httpx.Client) -> float:
    url = str(http.base_url).rstrip("/")
    return metric(url, 'reformer_chat_request_success_total{finished_reason="cancelled"}', default=0.0)


def wait_for_reply(http: httpx.Client, session_id: str) -> dict[str, Any]:
    """The session's stored reply, once the (cancelled) turn has been stored."""
    return stored_messages(str(http.base_url).rstrip("/"), session_id, 2, dict(http.headers))[1]


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


@pytest.mark.parametrize("include_usage", [False, True])
def test_sse_bytes_are_what_openai_sends(http: httpx.Client, include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    whole = http.post("/v1/chat/completions", json=body(http, **GREEDY)).json()
    response = http.post("/v1/chat/completions", json=body(http, stream=True, **GREEDY, **options))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    data = events(response.content)
    assert data[-1] == b"[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    # Compact JSON, exactly as re-serialised with OpenAI's separators.
    assert [json.dumps(c, ensure_ascii=False, separators=(",", ":")).encode() for c in chunks] == data[:-1]
    first, *content, last = chunks[:-1] if include_usage else chunks
    keys = {"id", "object", "created", "model", "choices"} | ({"usage"} if include_usage else set())
    for chunk in chunks:
        assert set(chunk) == keys
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == (
            first["id"],
            first["created"],
            whole["model"],
        )
        assert chunk["id"].startswith("chatcmpl-")
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    for chunk in content:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["delta"]["content"]
        assert choice["finish_reason"] is None
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in content)
        == whole["choices"][0]["message"]["content"]
    )
    assert last["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": whole["choices"][0]["finish_reason"]}
    ]
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_errors_have_openai_shape_and_status(http: httpx.Client, server: tuple[str, str]) -> None:
    missing = httpx.post(f"{server[0]}/v1/chat/completions", json=body(http))
    error = assert_openai_error(missing, 401, "invalid_api_key")
    assert error["type"] == "invalid_request_error"
    assert missing.headers["www-authenticate"] == "Bearer"
    broken = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert assert_openai_error(broken, 400, None)["type"] == "invalid_request_error"
    no_messages = http.post("/v1/chat/completions", json={"model": body(http)["model"]})
    assert assert_openai_error(no_messages, 400, None)["param"] == "messages"
    bad_role = http.post("/v1/chat/completions", json=body(http, messages=[{"role": "tool", "content": "x"}]))
    assert assert_openai_error(bad_role, 400, None)["param"] == "messages[0].role"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    refused = http.post("/v1/chat/completions", json=body(http, messages=image))
    assert assert_openai_error(refused, 400, "invalid_request")["param"] == "messages[0].content[0]"
    session = http.post("/v1/chat/completions", json=body(http), headers={"X-Session-Id": "bad id!"})
    assert_openai_error(session, 404, "session_not_found")
    # Over the body limit: refused unread (announced by Content-Length, or counted as it streams in),
    # still in OpenAI's shape, which the SDKs parse.
    huge = json.dumps(body(http, messages=[{"role": "user", "content": "x" * 10_000_000}])).encode()
    announced = http.post("/v1/chat/completions", content=huge, headers={"Content-Type": "application/json"})
    assert assert_openai_error(announced, 413, "payload_too_large")["type"] == "invalid_request_error"
    streamed = http.post(
        "/v1/chat/completions", content=iter([huge]), headers={"Content-Type": "application/json"}
    )
    assert_openai_error(streamed, 413, "payload_too_large")
    # The rest of the API keeps its own shape.
    ours = http.get("/v1/sessions/nonexistent-session-id")
    assert set(ours.json()["error"]) == {"code", "message"}


def test_a_busy_session_is_a_409_while_its_reply_streams(
    http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    headers = {"X-Session-Id": session_id}
    endless = body(http, stream=True, **endless_params(tokenizer, MAX_TOKENS))
    with http.stream("POST", "/v1/chat/completions", json=endless, headers=headers) as streaming:
        assert streaming.status_code == 200
        # Keep the iterator: a dropped one closes the connection, which would cancel the turn.
        chunks = streaming.iter_bytes()
        next(chunks)  # the role chunk: the turn holds the session now
        busy = http.post("/v1/chat/completions", json=body(http, **GREEDY), headers=headers)
        assert_openai_error(busy, 409, "session_busy")
    assert wait_for_reply(http, session_id)["finish_reason"] == "cancelled"


def test_hanging_up_a_session_stream_cancels_and_stores_the_partial_reply(
    http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    endless = body(http, stream=True, **endless_params(tokenizer, MAX_TOKENS))
    streamed = ""
    with http.stream("POST", "/v1/chat/completions", json=endless, headers={"X-Session-Id": session_id}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                streamed += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            if len(streamed) >= 5:
                break  # leaving the block closes the connection
    reply = wait_for_reply(http, session_id)
    assert reply["finish_reason"] == "cancelled"
    assert reply["content"].startswith(streamed)  # what was streamed, and what came before the hang-up
    again = http.post("/v1/chat/completions", json=body(http, **GREEDY), headers={"X-Session-Id": session_id})
    assert again.status_code == 200  # the session lock was released


def test_hanging_up_a_stateless_stream_stops_the_engine(http: httpx.Client, tokenizer: ChatTokenizer) -> None:
    before = cancelled_count(http)
    endless = body(http, stream=True, **endless_params(tokenizer, MAX_TOKENS))
    with http.stream("POST", "/v1/chat/completions", json=endless) as response:
        chunks = response.iter_bytes()
        next(chunks)  # generating; leaving the block hangs up
    # The generation ends as "cancelled" (not after MAX_TOKENS tokens as "length").
    poll_until(lambda: cancelled_count(http) >= before + 1, "the hung-up stream counted as cancelled")
    assert http.get("/admin/metrics").status_code == 200


def test_hanging_up_a_plain_completion_cancels_it(server: tuple[str, str], tokenizer: ChatTokenizer) -> None:
    url, prefix = server

    async def main() -> str:
        async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=None) as client:
            session_id = (await client.post("/v1/sessions")).json()["session_id"]
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            payload = {"model": model, "messages": HELLO, **endless_params(tokenizer, MAX_TOKENS)}
            request = asyncio.create_task(
                client.post("/v1/chat/completions", json=payload, headers={"X-Session-Id": session_id})
            )
            with redis.Redis.from_url(TEST_REDIS_URL) as r:  # the turn holds its lock: it is generating
                deadline = time.monotonic() + 120
                while not r.exists(f"{prefix}chat:{{{session_id}}}:lock"):
                    assert time.monotonic() < deadline, "the turn never took its session lock"
                    await asyncio.sleep(0.005)
            request.cancel()
            return session_id

    session_id = asyncio.run(main())
    with httpx.Client(base_url=url, headers=KEY, timeout=None) as http:
        reply = wait_for_reply(http, session_id)
        assert reply["finish_reason"] == "cancelled"
        assert len(reply["content"]) < MAX_TOKENS
