"""One turn at a time per session (409, even across replicas), and 429 when the engine is full."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import redis

from model.tokenizer import ChatTokenizer
from tests.support import (
    TEST_REDIS_URL,
    LiveServerFactory,
    endless_params,
    frame,
    open_ws,
    quiet_params,
    send,
    stored_messages,
)

MAX_TOKENS = 4000


@pytest.fixture(scope="module")
def server(live_server: LiveServerFactory) -> Iterator[tuple[str, str]]:
    # One reply at a time and none waiting, so that a second session's message finds the engine full.
    with live_server(max_new_tokens=MAX_TOKENS, max_running_requests=1, max_waiting_requests=0) as live:
        yield live.url, live.prefix


def test_two_concurrent_turns_on_one_session_one_gets_409(
    server: tuple[str, str], tokenizer: ChatTokenizer
) -> None:
    url, _ = server

    async def main() -> tuple[httpx.Response, str]:
        async with httpx.AsyncClient(base_url=url, timeout=None) as http:
            session_id = (await http.post("/v1/sessions")).json()["session_id"]
            path = f"/v1/sessions/{session_id}/messages"
            body = {"content": "first", **endless_params(tokenizer, MAX_TOKENS)}
            turns = [asyncio.create_task(http.post(path, json=body)) for _ in range(2)]
            done, pending = await asyncio.wait(turns, return_when=asyncio.FIRST_COMPLETED)
            refused = done.pop().result()
            for task in pending:  # hang up on the winner: its reply is cancelled and stored
                task.cancel()
            return refused, session_id

    refused, session_id = asyncio.run(main())
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "session_busy"
    # The cancelled turn is stored once the engine has stopped.
    messages = stored_messages(url, session_id, 2)
    assert [m["role"] for m in messages] == ["user", "assistant"]  # exactly one turn, not interleaved
    assert messages[1]["finish_reason"] == "cancelled"


def test_a_lock_held_by_another_replica_is_409(server: tuple[str, str]) -> None:
    url, prefix = server
    with httpx.Client(base_url=url, timeout=None) as http:
        session_id = http.post("/v1/sessions").json()["session_id"]
        lock_key = f"{prefix}chat:{{{session_id}}}:lock"
        with redis.Redis.from_url(TEST_REDIS_URL) as r:
            r.set(lock_key, "another-replica", px=60_000)
            busy = http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()})
            assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
            with open_ws(url, session_id, headers=None) as ws:
                send(ws, type="message", content="hi", **quiet_params())
                error = frame(ws)
                assert error["type"] == "error" and error["error"]["code"] == "session_busy"
            assert r.get(lock_key) == b"another-replica"  # not ours to release
            r.delete(lock_key)
        assert http.get(f"/v1/sessions/{session_id}").json()["messages"] == []
        ok = http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()})
        assert ok.status_code == 200


def test_a_full_engine_answers_429_with_retry_after(
    server: tuple[str, str], tokenizer: ChatTokenizer
) -> None:
    url, _ = server
    with httpx.Client(base_url=url, timeout=None) as http:
        busy_session = http.post("/v1/sessions").json()["session_id"]
        other_session = http.post("/v1/sessions").json()["session_id"]
        with open_ws(url, busy_session, headers=None) as ws:
            send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
            assert frame(ws)["type"] == "start"
            assert frame(ws)["type"] == "token"  # the engine's only slot is generating
            full = http.post(
                f"/v1/sessions/{other_session}/messages", json={"content": "hi", **quiet_params()}
            )
            assert full.status_code == 429
            assert full.json()["error"]["code"] == "overloaded" and full.headers["Retry-After"] == "1"
            ws.send(json.dumps({"type": "cancel"}))
            while (event := frame(ws))["type"] == "token":
                pass
            assert event["type"] == "done"
        # Refused means untouched: nothing stored, and the session works once there is room.
        assert http.get(f"/v1/sessions/{other_session}").json()["messages"] == []
        ok = http.post(f"/v1/sessions/{other_session}/messages", json={"content": "hi", **quiet_params()})
        assert ok.status_code == 200
