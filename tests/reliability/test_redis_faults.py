"""Redis is SIGKILLed mid-conversation and restarted from its append-only file (appendfsync always).

While it is down, every request that needs it is a 503 `store_unavailable` with Retry-After, readiness is
503, and the app process stays up; a reply being generated at the moment of the kill is not stored (its
client gets an error frame). Once Redis is back the same process serves again without a restart, and
every turn acknowledged to a client before the kill is there, whole: a turn that was in flight is either
absent or complete, never half written.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from model.tokenizer import ChatTokenizer
from tests.support import (
    AppProcess,
    RedisServer,
    app_env,
    endless_params,
    frame,
    new_prefix,
    open_ws,
    poll_until,
    quiet_params,
    send,
)

WRITERS = 3
MAX_TOKENS = 4000  # endless replies run until cancelled


@dataclass
class Writer:
    """One client chatting on its own session until a turn fails; what it was told is the record."""

    url: str
    session_id: str
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (user content, reply)
    failed: tuple[str, httpx.Response] | None = None  # the turn that was not acknowledged
    progress: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=None) as http:
            for n in range(10_000):
                content = f"turn {n} of {self.session_id[:6]}"
                response = http.post(
                    f"/v1/sessions/{self.session_id}/messages",
                    json={"content": content, **quiet_params(max_tokens=6)},
                )
                if response.status_code != 200:
                    self.failed = (content, response)
                    return
                self.acknowledged.append((content, response.json()["message"]["content"]))
                if len(self.acknowledged) >= 2:
                    self.progress.set()


def stored_turns(http: httpx.Client, session_id: str) -> list[tuple[str, str]]:
    messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2), messages
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def turns_in_ids(server: RedisServer, prefix: str, session_id: str, tokenizer: ChatTokenizer) -> int:
    """Turns the stored token ids hold: each opens with the user role id (a reply stops before one, and
    typed text never becomes one), so ids and messages must agree."""
    with server.client() as client:
        ids = np.frombuffer(client.get(f"{prefix}chat:{{{session_id}}}:ids") or b"", dtype="<u4")
    return int((ids == tokenizer.user_id).sum())


def test_redis_sigkill_and_aof_restart_lose_no_acknowledged_turn(
    tiny_checkpoint: Path, tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    prefix = new_prefix()
    settings = {"max_new_tokens": MAX_TOKENS, "retry_after_seconds": 3}
    with (
        RedisServer(tmp_path / "redis", aof=True) as redis_server,
        AppProcess(
            tmp_path / "app",
            "app",
            app_env(tiny_checkpoint, redis_server.url, prefix, **settings),
        ) as app,
        httpx.Client(base_url=app.url, timeout=None) as http,
    ):
        writers = [Writer(app.url, http.post("/v1/sessions").json()["session_id"]) for _ in range(WRITERS)]
        threads = [threading.Thread(target=w.run, name=f"writer-{i}") for i, w in enumerate(writers)]
        for thread in threads:
            thread.start()
        for writer in writers:
            writer.progress.wait()

        # A reply is streaming when Redis dies.
        streaming = http.post("/v1/sessions").json()["session_id"]
        with open_ws(app.url, streaming) as ws:
            send(ws, type="message", content="Talk forever.", **endless_params(tokenizer, MAX_TOKENS))
            assert frame(ws)["type"] == "start"
            assert frame(ws)["type"] == "token"
            redis_server.kill()
            for thread in threads:
                thread.join()  # each writer stops at its first unacknowledged turn
            send(ws, type="cancel")
            while (event := frame(ws))["type"] == "token":
                pass
            assert event["type"] == "error", event
            assert event["error"]["code"] == "store_unavailable" and event["retry_after"] == 3

        for writer in writers:
            assert writer.failed is not None
            _, refused = writer.failed
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert refused.headers["Retry-After"] == "3"
        for method, path in [("GET", f"/v1/sessions/{streaming}"), ("POST", "/v1/sessions")]:
            down = http.request(method, path)
            assert down.status_code == 503 and down.headers["Retry-After"] == "3", down.text
        not_ready = http.get("/admin/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["message"].startswith("redis:")
        assert http.get("/admin/health").status_code == 200 and app.alive

        redis_server.start()  # same port, same directory: the append-only file is replayed
        # The same process, no restart: it reconnects by itself.
        poll_until(lambda: http.get("/admin/ready").status_code == 200, "readiness once Redis is back")

        for writer in writers:
            stored = stored_turns(http, writer.session_id)
            acknowledged = writer.acknowledged
            assert stored[: len(acknowledged)] == acknowledged  # every acknowledged turn, in order
            # The turn in flight at the kill is absent, or whole if Redis wrote it before dying.
            unacknowledged = stored[len(acknowledged) :]
            assert len(unacknowledged) <= 1
            assert all(user == writer.failed[0] for user, _ in unacknowledged)
            assert turns_in_ids(redis_server, prefix, writer.session_id, tokenizer) == len(stored)
        assert stored_turns(http, streaming) == []  # the reply cut off by the kill was never stored
        assert turns_in_ids(redis_server, prefix, streaming, tokenizer) == 0

        # Every conversation goes on. A turn lock left by the kill expires within SESSION_LOCK_SECONDS.
        for session_id in [streaming, *(w.session_id for w in writers)]:
            before = len(stored_turns(http, session_id))
            body = {"content": "Still there?", **quiet_params()}

            def answered(session_id: str = session_id, body: dict[str, Any] = body) -> httpx.Response | None:
                turn = http.post(f"/v1/sessions/{session_id}/messages", json=body)
                return None if turn.status_code == 409 else turn

            turn = poll_until(answered, "the turn lock left by the kill expiring", every=0.1)
            assert turn.status_code == 200, turn.text
            assert len(stored_turns(http, session_id)) == before + 1
        assert app.alive
