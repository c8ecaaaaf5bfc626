"""Two replicas (two `python -m app` processes) on one Redis serve one session.

Turns sent to both at once: exactly one runs and the other gets 409 `session_busy` (the turn lock lives
in Redis, not in either process). Turns that alternate between the replicas keep one coherent history:
whole turns in order, token ids in step with the messages, and the same greedy replies as one replica
alone gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.tokenizer import ChatTokenizer
from tests.support import (
    AppProcess,
    RedisServer,
    app_env,
    endless_params,
    new_prefix,
    quiet_params,
    stored_messages,
)

MAX_TOKENS = 4000
TURNS = ("Hi!", "What do you like to do?", "Why is that?", "Bye now.")


@pytest.fixture(scope="module")
def replicas(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RedisServer, str, str, str]]:
    """(Redis, key prefix, URL of replica A, URL of replica B): two processes sharing one prefix."""
    workdir = tmp_path_factory.mktemp("replicas")
    prefix = new_prefix()
    with RedisServer(workdir / "redis", aof=False) as redis_server:
        env = app_env(tiny_checkpoint, redis_server.url, prefix, max_new_tokens=MAX_TOKENS)
        with AppProcess(workdir, "a", env) as a, AppProcess(workdir, "b", env) as b:
            yield redis_server, prefix, a.url, b.url


def messages(url: str, session_id: str) -> list[dict]:
    return httpx.get(f"{url}/v1/sessions/{session_id}").json()["messages"]


def test_concurrent_turns_from_both_replicas_get_exactly_one_409(
    replicas: tuple[RedisServer, str, str, str], tokenizer: ChatTokenizer
) -> None:
    _, _, url_a, url_b = replicas
    session_id = httpx.post(f"{url_a}/v1/sessions").json()["session_id"]
    body = {"content": "Both at once.", **endless_params(tokenizer, MAX_TOKENS)}

    async def race() -> tuple[list[httpx.Response], int]:
        async with httpx.AsyncClient(timeout=None) as http:
            turns = [
                asyncio.create_task(http.post(f"{url}/v1/sessions/{session_id}/messages", json=body))
                for url in (url_a, url_b)
            ]
            # The winner generates until it is hung up on, so whatever answers first is the loser.
            done, pending = await asyncio.wait(turns, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()  # hang up on the winner: its reply is cancelled and stored
            return [task.result() for task in done], len(pending)

    for round_ in range(2):
        answered, running = asyncio.run(race())
        assert running == 1 and len(answered) == 1
        refused = answered[0]
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "session_busy"
        # The winner's cancelled turn is stored once its engine has stopped.
        stored = stored_messages(url_a, session_id, 2 * (round_ + 1))
        assert [m["role"] for m in stored] == ["user", "assistant"] * (round_ + 1)  # never interleaved
        assert stored[-1]["finish_reason"] == "cancelled"
    assert messages(url_b, session_id) == stored


def test_alternating_replicas_keep_a_coherent_history(
    replicas: tuple[RedisServer, str, str, str], tokenizer: ChatTokenizer
) -> None:
    redis_server, prefix, url_a, url_b = replicas

    def converse(urls: list[str]) -> tuple[str, list[str], list[int]]:
        session_id = httpx.post(f"{urls[0]}/v1/sessions").json()["session_id"]
        replies, contexts = [], []
        for url, content in zip(urls, TURNS, strict=True):
            body = {"content": content, **quiet_params(max_tokens=10)}
            response = httpx.post(f"{url}/v1/sessions/{session_id}/messages", json=body, timeout=None)
            assert response.status_code == 200, response.text
            replies.append(response.json()["message"]["content"])
            contexts.append(response.json()["usage"]["context_tokens"])
        return session_id, replies, contexts

    _, alone, _ = converse([url_a] * len(TURNS))
    session_id, alternating, contexts = converse([url_a, url_b, url_a, url_b])
    assert alternating == alone and any(alone)

    stored = messages(url_b, session_id)
    assert stored == messages(url_a, session_id)
    expected = [text for pair in zip(TURNS, alone, strict=True) for text in pair]
    assert [m["content"] for m in stored] == expected
    assert contexts == sorted(set(contexts))  # each turn appended to the one before
    with redis_server.client() as client:
        ids = np.frombuffer(client.get(f"{prefix}chat:{{{session_id}}}:ids") or b"", dtype="<u4")
    assert len(ids) == contexts[-1]
    # Whole turns only: one user turn and one end-closed reply per message pair, in order.
    assert int((ids == tokenizer.user_id).sum()) == len(TURNS)
    assert int((ids == tokenizer.assistant_id).sum()) == len(TURNS)
    assert ids[0] == tokenizer.user_id and ids[-1] == tokenizer.end_id
