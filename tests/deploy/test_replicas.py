"""Two `python -m app` processes on one Redis, as two replicas behind a load balancer.

tests/e2e/test_state_rebuild.py already hands a conversation between two servers running as threads of
the test process. This adds what only separate processes show: each replica is configured purely by
environment variables, as docker-compose configures it, with its own engine, state cache and metrics, and
nothing shared but Redis. One conversation moves between them turn by turn: after every turn the other
replica reads the whole, ordered history; the replica that has not seen the conversation rebuilds its
decode state from the stored token ids (a state-cache miss, history re-fed); and the greedy replies are
those of the same conversation held by one replica alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_state_rebuild import ADMIN, TURNS, converse, counter
from tests.support import TEST_REDIS_URL, AppProcess, app_env, quiet_params

REPO = Path(__file__).resolve().parents[2]
_ANNOUNCED = re.compile(rb"serving at (http://\S+)")


def replica_environment(checkpoint: Path, prefix: str, data_dir: Path) -> dict[str, str]:
    """This replica's settings, as environment variables only (AppProcess passes nothing else on)."""
    return app_env(
        checkpoint,
        TEST_REDIS_URL,
        prefix,
        admin_token=ADMIN["Authorization"].removeprefix("Bearer "),
        prefill_chunk_tokens=7,
        data_dir=data_dir,
        session_lock_seconds=30,
        omp_num_threads=1,
    )


@pytest.fixture
def replicas(tiny_checkpoint: Path, redis_prefix: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two replica processes sharing CI's Redis under one test prefix (its keys removed afterwards)."""
    env = replica_environment(tiny_checkpoint, redis_prefix, tmp_path / "data")
    with AppProcess(tmp_path, "a", env) as a, AppProcess(tmp_path, "b", env) as b:
        yield a.url, b.url
        a.stop()  # a graceful stop, as on Ctrl+C or `docker stop`
        b.stop()


def cache_misses(url: str) -> float:
    return counter(url, "reformer_chat_state_cache_queries_total") - counter(
        url, "reformer_chat_state_cache_hits_total"
    )


def refed_tokens(url: str) -> float:
    """Tokens fed before generating beyond the new prompts: history the replica's state had not seen."""
    return counter(url, "reformer_chat_prefill_tokens_total") - counter(
        url, "reformer_chat_prompt_tokens_total"
    )


def test_a_conversation_moves_between_replica_processes_turn_by_turn(replicas: tuple[str, str]) -> None:
    a, b = replicas
    alone = converse([a] * len(TURNS))

    session_id = httpx.post(f"{b}/v1/sessions").json()["session_id"]  # created on one, answered on both
    history: list[tuple[str, str]] = []
    replies = []
    for turn, (url, content) in enumerate(zip([a, b, a, b], TURNS, strict=True)):
        other = b if url == a else a
        misses = cache_misses(url)
        refed_before = refed_tokens(url)

        body = {"content": content, **quiet_params(max_tokens=10)}
        response = httpx.post(f"{url}/v1/sessions/{session_id}/messages", json=body, timeout=None)
        assert response.status_code == 200, response.text
        reply = response.json()
        replies.append(reply["message"]["content"])
        history += [("user", content), ("assistant", reply["message"]["content"])]

        # The other replica sees the whole conversation, in order, right after the turn.
        seen = httpx.get(f"{other}/v1/sessions/{session_id}").json()
        assert [(m["role"], m["content"]) for m in seen["messages"]] == history
        assert seen["context_tokens"] == reply["usage"]["context_tokens"]

        refed = refed_tokens(url) - refed_before
        if turn < 2:
            # First turn on each replica: nothing cached there, so a miss; on b the state is rebuilt
            # from the token ids a stored, so the earlier turn is fed again besides the new prompt.
            assert cache_misses(url) - misses == 1
            assert (refed > 0) == (turn == 1)
        else:
            # Back on a replica whose cached state is behind Redis: a hit, feeding only what it missed.
            assert cache_misses(url) == misses
            assert refed > 0

    assert all(alone), "empty replies would make the comparison vacuous"
    assert replies == alone
