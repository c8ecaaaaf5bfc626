"""The app is SIGKILLed while it generates a reply, then started again.

No half turn is visible (the cut-off reply was never stored), the session goes on, and the restarted
process, with an empty state cache, rebuilds the session's decode state from the stored token ids and
gives the same greedy reply the first process gave to the same conversation before the crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from model.tokenizer import ChatTokenizer
from tests.support import (
    AppProcess,
    RedisServer,
    app_env,
    endless_params,
    frame,
    metric,
    new_prefix,
    open_ws,
    poll_until,
    quiet_params,
    send,
)

MAX_TOKENS = 4000
ADMIN = {"Authorization": "Bearer admin"}
FIRST, SECOND, THIRD = "Hello there!", "Tell me a long story.", "And then?"


def turn(http: httpx.Client, session_id: str, content: str, fields: dict[str, Any]) -> str:
    """One REST turn's reply; a lock left by a killed process is a 409 until it expires."""
    path = f"/v1/sessions/{session_id}/messages"

    def answered() -> httpx.Response | None:
        response = http.post(path, json={"content": content, **fields})
        return None if response.status_code == 409 else response

    response = poll_until(answered, "the killed process's turn lock expiring (409 until then)", every=0.1)
    assert response.status_code == 200, response.text
    return response.json()["message"]["content"]


def test_a_crash_mid_generation_leaves_no_half_turn_and_the_rebuilt_state_agrees(
    tiny_checkpoint: Path, tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    # Greedy (temperature 0) with the end-of-turn tokens banned: the long reply the crash cuts off and
    # the short one asked for after it are prefixes of one and the same greedy continuation.
    long_reply = endless_params(tokenizer, MAX_TOKENS)
    short_reply = endless_params(tokenizer, 24)
    with RedisServer(tmp_path / "redis", aof=False) as redis_server:
        env = app_env(
            tiny_checkpoint, redis_server.url, new_prefix(), max_new_tokens=MAX_TOKENS, admin_token="admin"
        )
        first = AppProcess(tmp_path / "app", "first", env)
        with first, httpx.Client(base_url=first.url, timeout=None) as http:
            # The reference: the same conversation, uninterrupted, on the first process.
            reference = http.post("/v1/sessions").json()["session_id"]
            reference_first = turn(http, reference, FIRST, quiet_params())
            reference_second = turn(http, reference, SECOND, short_reply)
            reference_third = turn(http, reference, THIRD, quiet_params())
            assert reference_second, "an empty reply would make the comparison vacuous"

            session_id = http.post("/v1/sessions").json()["session_id"]
            assert turn(http, session_id, FIRST, quiet_params()) == reference_first
            before_crash = http.get(f"/v1/sessions/{session_id}").json()
            with open_ws(first.url, session_id) as ws:
                send(ws, type="message", content=SECOND, **long_reply)
                assert frame(ws)["type"] == "start"
                streamed = "".join(frame(ws)["text"] for _ in range(3))
                first.kill()  # mid-generation: the reply is being streamed
            assert reference_second.startswith(streamed)

        second = AppProcess(tmp_path / "app", "second", env)
        with second, httpx.Client(base_url=second.url, timeout=None) as http:
            assert http.get(f"/v1/sessions/{session_id}").json() == before_crash  # no half turn
            rebuilt_before = metric(second.url, "reformer_chat_prefill_tokens_total", ADMIN)
            assert turn(http, session_id, SECOND, short_reply) == reference_second
            # The state was rebuilt from Redis (an empty cache), not found: the whole history was re-fed.
            assert metric(second.url, "reformer_chat_state_cache_hits_total", ADMIN) == 0
            assert metric(second.url, "reformer_chat_prefill_tokens_total", ADMIN) - rebuilt_before > len(
                tokenizer.encode_turn("user", SECOND)
            )
            assert turn(http, session_id, THIRD, quiet_params()) == reference_third
            messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
            assert [m["content"] for m in messages if m["role"] == "user"] == [FIRST, SECOND, THIRD]
