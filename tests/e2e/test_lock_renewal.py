"""A turn that outlives its lock's lifetime keeps the lock: the store renews it while the reply is
generated, so a second turn on the session is still refused (409) and the first is stored whole.

With SESSION_LOCK_SECONDS=2 and the first reply running for 5 s, an unrenewed lock would have expired
twice over: the second turn would then get 200, and the first would end `store_unavailable` (its lock
lost). Nothing here measures time; the sleep only lets the lock's lifetime pass.
"""

from __future__ import annotations

import time

import httpx

from model.tokenizer import ChatTokenizer
from tests.support import LiveServerFactory, endless_params, frame, open_ws, quiet_params, send

# 2 s, renewed every 2/3 s: an event loop starved for over a second on a loaded machine does not lose it.
LOCK_SECONDS = 2
REPLY_SECONDS = 5  # 2.5 lifetimes of the lock
MAX_TOKENS = 1_000_000  # ended by a cancel, never by the count


def test_a_long_turn_keeps_its_lock_past_the_lock_lifetime(
    live_server: LiveServerFactory, tokenizer: ChatTokenizer
) -> None:
    with (
        live_server(session_lock_seconds=LOCK_SECONDS, max_new_tokens=MAX_TOKENS) as live,
        httpx.Client(base_url=live.url, timeout=None) as http,
    ):
        session_id = http.post("/v1/sessions").json()["session_id"]
        with open_ws(live.url, session_id) as ws:
            send(ws, type="message", content="tell me everything", **endless_params(tokenizer, MAX_TOKENS))
            try:
                assert frame(ws)["type"] == "start"
                assert frame(ws)["type"] == "token"  # generating: the lock is held
                time.sleep(REPLY_SECONDS)
                second = http.post(
                    f"/v1/sessions/{session_id}/messages", json={"content": "me too", **quiet_params()}
                )
            finally:  # end the first reply whatever happened, so a failure cannot hang the test
                send(ws, type="cancel")
                while (event := frame(ws))["type"] == "token":
                    pass
        assert second.status_code == 409, second.text
        assert second.json()["error"]["code"] == "session_busy"
        assert event["type"] == "done", event  # stored: its lock was never lost
        assert event["message"]["finish_reason"] == "cancelled"
        messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"] == event["message"]["content"]
