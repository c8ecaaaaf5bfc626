"""REST end to end on a real uvicorn + CI's Redis: sessions, turns, stored token ids, auth, error shapes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from model.tokenizer import ChatTokenizer
from tests.support import TEST_REDIS_URL, LiveServerFactory, endless_params, quiet_params, stored_messages

KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}
MAX_CHARS = 400
# High enough that an endless reply (see endless_params) is still running when a test hangs up on it.
MAX_TOKENS = 4000


@pytest.fixture(scope="module")
def server(live_server: LiveServerFactory) -> Iterator[tuple[str, str]]:
    """(base URL, key prefix) of a server with two API keys."""
    with live_server(api_keys=["key-a", "key-b"], max_new_tokens=MAX_TOKENS) as live:
        yield live.url, live.prefix


@pytest.fixture
def client(server: tuple[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], headers=KEY_A, timeout=None) as http:
        yield http


def new_session(client: httpx.Client) -> str:
    response = client.post("/v1/sessions")
    assert response.status_code == 201
    return response.json()["session_id"]


def stored_ids(prefix: str, session_id: str) -> list[int]:
    with redis.Redis.from_url(TEST_REDIS_URL) as r:
        return np.frombuffer(r.get(f"{prefix}chat:{{{session_id}}}:ids") or b"", dtype="<u4").tolist()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body


def test_a_conversation_from_create_to_delete(client: httpx.Client, tokenizer: ChatTokenizer) -> None:
    created = client.post("/v1/sessions")
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    assert len(session_id) >= 22 and created.json()["created_at"].endswith("Z")
    empty = {
        "session_id": session_id,
        "created_at": created.json()["created_at"],
        "messages": [],
        "context_tokens": 0,
    }
    assert client.get(f"/v1/sessions/{session_id}").json() == empty

    context = 0
    for content in ("Hi! How was your day?", "Tell me more."):
        reply = client.post(
            f"/v1/sessions/{session_id}/messages", json={"content": content, **quiet_params()}
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["message"]["role"] == "assistant"
        assert body["message"]["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(tokenizer.encode_turn("user", content)) + 1
        assert usage["completion_tokens"] <= 8
        context += usage["prompt_tokens"] + usage["completion_tokens"] + 1  # + end-of-turn
        assert usage["context_tokens"] == context

    session = client.get(f"/v1/sessions/{session_id}").json()
    assert [m["role"] for m in session["messages"]] == ["user", "assistant", "user", "assistant"]
    assert session["messages"][2]["content"] == "Tell me more."
    assert session["messages"][3]["content"] == body["message"]["content"]
    assert "finish_reason" not in session["messages"][0]
    assert session["context_tokens"] == context

    assert client.delete(f"/v1/sessions/{session_id}").status_code == 204
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")


def test_token_ids_grow_per_turn_and_history_is_never_retokenised(
    client: httpx.Client, server: tuple[str, str], tokenizer: ChatTokenizer
) -> None:
    session_id = new_session(client)
    first = client.post(
        f"/v1/sessions/{session_id}/messages", json={"content": "Hello!", **quiet_params()}
    ).json()
    after_first = stored_ids(server[1], session_id)
    prompt = [*tokenizer.encode_turn("user", "Hello!"), tokenizer.assistant_id]
    assert after_first[: len(prompt)] == prompt
    assert after_first[-1] == tokenizer.end_id
    assert tokenizer.decode(after_first[len(prompt) : -1]) == first["message"]["content"]

    client.post(f"/v1/sessions/{session_id}/messages", json={"content": "Bye.", **quiet_params()})
    after_second = stored_ids(server[1], session_id)
    assert after_second[: len(after_first)] == after_first  # appended, not rewritten
    second_prompt = [*tokenizer.encode_turn("user", "Bye."), tokenizer.assistant_id]
    assert after_second[len(after_first) : len(after_first) + len(second_prompt)] == second_prompt


def test_greedy_and_seeded_replies_are_reproducible(client: httpx.Client) -> None:
    def reply(fields: dict[str, Any]) -> str:
        session_id = new_session(client)
        response = client.post(
            f"/v1/sessions/{session_id}/messages", json={"content": "What's new?", **fields}
        )
        return response.json()["message"]["content"]

    assert reply(quiet_params()) == reply(quiet_params())
    seeded = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 1234, "max_tokens": 12}
    assert reply(seeded) == reply(seeded)


def test_sessions_are_private_to_their_key(server: tuple[str, str]) -> None:
    url = server[0]
    with httpx.Client(base_url=url, timeout=None) as anonymous:
        assert_error(anonymous.post("/v1/sessions"), 401, "unauthorized")
        assert anonymous.post("/v1/sessions").headers["WWW-Authenticate"] == "Bearer"
        assert_error(
            anonymous.post("/v1/sessions", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"
        )
        session_id = new_session(httpx.Client(base_url=url, headers=KEY_A, timeout=None))
        unknown = "A" * len(session_id)
        for method, path, body in [
            ("GET", f"/v1/sessions/{session_id}", None),
            ("DELETE", f"/v1/sessions/{session_id}", None),
            ("POST", f"/v1/sessions/{session_id}/messages", {"content": "hi", **quiet_params()}),
        ]:
            assert_error(anonymous.request(method, path, json=body), 401, "unauthorized")
            other = anonymous.request(method, path, json=body, headers=KEY_B)
            missing = anonymous.request(method, path.replace(session_id, unknown), json=body, headers=KEY_B)
            # Another key's session looks exactly like one that does not exist.
            assert_error(other, 404, "session_not_found")
            assert (
                other.json()["error"]["message"].replace(session_id, unknown)
                == missing.json()["error"]["message"]
            )
        # ... and key A's session is untouched by key B's attempts.
        owner = anonymous.get(f"/v1/sessions/{session_id}", headers=KEY_A).json()
        assert owner["messages"] == []


BAD_BODIES: list[Any] = [
    {"content": ""},
    {"content": "   \n\t"},
    {"content": "x" * (MAX_CHARS + 1)},
    {"content": 123},
    {},
    {"content": "hi", "temperature": -0.1},
    {"content": "hi", "top_p": 0},
    {"content": "hi", "top_p": 1.01},
    {"content": "hi", "top_k": -1},
    {"content": "hi", "repetition_penalty": 0},
    {"content": "hi", "max_tokens": 0},
    {"content": "hi", "max_tokens": MAX_TOKENS + 1},
    {"content": "hi", "seed": -1},
    {"content": "hi", "stop": [""]},
    {"content": "hi", "stop": ["a", "b", "c", "d", "e"]},
    {"content": "hi", "logit_bias": {"999999": 1}},
    {"content": "hi", "logit_bias": {"5": 101}},
    {"content": "hi", "temprature": 0.5},
    ["content", "hi"],
]


def test_invalid_messages_are_422_and_store_nothing(client: httpx.Client, server: tuple[str, str]) -> None:
    session_id = new_session(client)
    path = f"/v1/sessions/{session_id}/messages"
    for body in BAD_BODIES:
        assert_error(client.post(path, json=body), 422, "invalid_request")
    for raw in (b"{", b"content=hi", b"\xff\xfe", b'{"content": "lone \\ud800 surrogate"}'):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_error(response, 422, "invalid_request")
    session = client.get(f"/v1/sessions/{session_id}").json()
    assert session["messages"] == [] and session["context_tokens"] == 0
    assert stored_ids(server[1], session_id) == []


def test_oversize_bodies_are_413(client: httpx.Client) -> None:
    session_id = new_session(client)
    path = f"/v1/sessions/{session_id}/messages"
    huge = json.dumps({"content": "x" * 100_000}).encode()
    assert_error(
        client.post(path, content=huge, headers={"Content-Type": "application/json"}),
        413,
        "payload_too_large",
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1000
        yield huge

    chunked = client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(chunked, 413, "payload_too_large")
    assert client.get(f"/v1/sessions/{session_id}").json()["messages"] == []


def test_unknown_things_are_404_in_the_error_shape(client: httpx.Client) -> None:
    assert_error(client.get("/v1/sessions/" + "Z" * 32), 404, "session_not_found")
    assert_error(client.get("/v1/sessions/not{a}valid:id"), 404, "session_not_found")
    assert_error(client.post("/v1/sessions/short/messages", json={"content": "hi"}), 404, "session_not_found")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.put("/v1/sessions"), 405, "method_not_allowed")


def test_no_half_turn_is_ever_visible(client: httpx.Client, server: tuple[str, str]) -> None:
    """A reader polling during turns sees whole turns only: messages and token ids move together."""
    url, _ = server
    session_id = new_session(client)

    async def main() -> list[tuple[int, int]]:
        async with httpx.AsyncClient(base_url=url, headers=KEY_A, timeout=None) as http:
            done = asyncio.Event()
            seen: list[tuple[int, int]] = []

            async def reader() -> None:
                while not done.is_set():
                    session = (await http.get(f"/v1/sessions/{session_id}")).json()
                    seen.append((len(session["messages"]), session["context_tokens"]))

            task = asyncio.create_task(reader())
            for n in range(4):
                body = {"content": f"message {n}", **quiet_params(max_tokens=6)}
                assert (await http.post(f"/v1/sessions/{session_id}/messages", json=body)).status_code == 200
            done.set()
            await task
            return seen

    seen = asyncio.run(main())
    assert all(messages % 2 == 0 for messages, _ in seen)
    by_messages: dict[int, set[int]] = {}
    for messages, tokens in seen:
        by_messages.setdefault(messages, set()).add(tokens)
    assert all(len(tokens) == 1 for tokens in by_messages.values())  # each turn count has one token count


def test_a_client_that_hangs_up_cancels_its_reply(server: tuple[str, str], tokenizer: ChatTokenizer) -> None:
    url, _ = server

    async def main() -> str:
        async with httpx.AsyncClient(base_url=url, headers=KEY_A, timeout=None) as http:
            session_id = (await http.post("/v1/sessions")).json()["session_id"]
            body = {"content": "go on forever", **endless_params(tokenizer, MAX_TOKENS)}
            # The first token-level sign of life is the turn lock: wait until the turn holds it.
            request = asyncio.create_task(http.post(f"/v1/sessions/{session_id}/messages", json=body))
            with redis.Redis.from_url(TEST_REDIS_URL) as r:
                deadline = time.monotonic() + 120
                while not r.exists(f"{server[1]}chat:{{{session_id}}}:lock"):
                    assert time.monotonic() < deadline, "the turn never took its session lock"
                    await asyncio.sleep(0.005)
            request.cancel()
            return session_id

    session_id = asyncio.run(main())
    with httpx.Client(base_url=url, headers=KEY_A, timeout=None) as http:
        # The cancelled turn is stored once the engine has stopped.
        messages = stored_messages(url, session_id, 2, KEY_A)
        assert messages[1]["finish_reason"] == "cancelled"
        again = http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()})
        assert again.status_code == 200  # the lock was released
