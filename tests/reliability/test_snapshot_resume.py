"""A restarted server, and a second replica, resume a long conversation from its snapshot in Redis.

Real `python -m app` processes on a redis-server of the test's own. A conversation and its twin (the same
messages, so the same greedy history) grow long; the server is stopped (SIGTERM, as on a deploy, or
SIGKILL, as in a crash) after the twin's next turn was answered warm. The new process's first turn on the
conversation must resume from the snapshot (metric), feed only the ids after it plus the new message
(prefill metric), and reply exactly what the warm server replied in the twin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from model.tokenizer import ChatTokenizer
from tests import support
from tests.support import AppProcess, RedisServer, app_env, new_prefix, poll_until, quiet_params

ADMIN = {"Authorization": "Bearer admin"}
SNAP = "reformer_chat_snapshot"
PREFILL = "reformer_chat_prefill_tokens_total"
# Long for the tiny model (an LSH capacity of 32 tokens per round): the state wrapped many times over.
LONG = " ".join(["Tell me everything about the sea, the ships, the harbours and the sailors."] * 10)
TURNS = ("Hi!", "What do you like to do?", "Why is that?", "Bye now.")
SNAPSHOT_EVERY_TURN = {"snapshot_min_tokens": 0, "snapshot_every_tokens": 1}


def metric(http: httpx.Client, name: str) -> float:
    return support.metric(str(http.base_url).rstrip("/"), name, ADMIN, default=0.0)


def turn(http: httpx.Client, session_id: str, content: str) -> str:
    """One greedy REST turn; a lock left by a killed process is a 409 until it expires."""
    path = f"/v1/sessions/{session_id}/messages"
    body: dict[str, Any] = {"content": content, **quiet_params(max_tokens=12)}

    def answered() -> httpx.Response | None:
        response = http.post(path, json=body)
        return None if response.status_code == 409 else response

    response = poll_until(answered, "the killed process's turn lock expiring (409 until then)", every=0.1)
    assert response.status_code == 200, response.text
    return response.json()["message"]["content"]


def wait_for_writes(http: httpx.Client, count: int) -> None:
    poll_until(lambda: metric(http, f"{SNAP}_writes_total") >= count, f"{count} snapshot writes")


def snapshot_tokens(client: redis.Redis, prefix: str, session_id: str) -> int:
    return int(client.hget(f"{prefix}chat:{{{session_id}}}:snap", "tokens") or 0)


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGKILL"])
def test_a_restarted_server_resumes_from_the_snapshot_and_replies_as_a_warm_one(
    tiny_checkpoint: Path, tokenizer: ChatTokenizer, tmp_path: Path, signal: str
) -> None:
    with RedisServer(tmp_path / "redis", aof=False) as redis_server, redis_server.client() as client:
        prefix = new_prefix()
        env = app_env(
            tiny_checkpoint, redis_server.url, prefix, admin_token="admin", max_message_chars=4000,
            **SNAPSHOT_EVERY_TURN,
        )  # fmt: skip
        first = AppProcess(tmp_path / "app", "first", env)
        with first, httpx.Client(base_url=first.url, timeout=None) as http:
            session_id, twin = (http.post("/v1/sessions").json()["session_id"] for _ in range(2))
            for content in (LONG, LONG + " Again."):
                assert turn(http, session_id, content) == turn(http, twin, content)
            last = LONG + " Once more."
            turn(http, twin, last)
            warm_reply = turn(http, twin, "And then?")  # the twin's state is cached: a warm turn
            turn(http, session_id, last)  # its snapshot is written as the server is stopped
            if signal == "SIGKILL":
                wait_for_writes(http, 7)  # a crash keeps only what was written before it
            if signal == "SIGTERM":
                first.terminate()  # a graceful stop finishes the snapshot writes in flight
            else:
                first.kill()

        second = AppProcess(tmp_path / "app", "second", env)
        with second, httpx.Client(base_url=second.url, timeout=None) as http:
            stored = http.get(f"/v1/sessions/{session_id}").json()["context_tokens"]
            covered = snapshot_tokens(client, prefix, session_id)
            assert stored > 1000 and 0 < stored - covered <= 2  # the ids after it: the reply's end
            assert turn(http, session_id, "And then?") == warm_reply
            assert metric(http, f"{SNAP}_resumes_total") == 1
            prompt = len(tokenizer.encode_turn("user", "And then?")) + 1
            assert metric(http, PREFILL) == stored - covered + prompt  # only the tail was fed


def test_two_replicas_alternating_resume_from_each_others_snapshots(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis", aof=False) as redis_server:
        env = app_env(
            tiny_checkpoint, redis_server.url, new_prefix(), admin_token="admin", **SNAPSHOT_EVERY_TURN
        )
        with (
            AppProcess(tmp_path, "a", env) as a,
            AppProcess(tmp_path, "b", env) as b,
            httpx.Client(base_url=a.url, timeout=None) as http_a,
            httpx.Client(base_url=b.url, timeout=None) as http_b,
        ):
            alone = http_a.post("/v1/sessions").json()["session_id"]
            reference = [turn(http_a, alone, content) for content in TURNS]
            wait_for_writes(http_a, len(TURNS))

            session_id = http_a.post("/v1/sessions").json()["session_id"]
            replicas = [http_a, http_b, http_a, http_b]
            writes = {id(http_a): len(TURNS), id(http_b): 0}
            replies = []
            for http, content in zip(replicas, TURNS, strict=True):
                replies.append(turn(http, session_id, content))
                writes[id(http)] += 1
                wait_for_writes(http, writes[id(http)])  # the other replica's next turn finds it
            assert replies == reference
            # Every turn but the very first resumed from the snapshot the other replica had just written
            # (a's cached state from turn 1 is behind turn 2, which b answered).
            assert metric(http_a, f"{SNAP}_resumes_total") == 1
            assert metric(http_b, f"{SNAP}_resumes_total") == 2
            assert metric(http_a, "reformer_chat_snapshot_rejected_total") == 0
