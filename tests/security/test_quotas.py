"""Storage quotas per key: sessions held and bytes stored. Refusals are a clean 409 `quota_exceeded`
that stores nothing and loses nothing; the ledger in Redis agrees with what is stored; concurrent
creations cannot pass the limit together; sessions that expired stop counting; other keys are untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from app.config import Settings
from tests.support import TEST_REDIS_URL, make_settings, require_redis, serving

KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}
MAX_SESSIONS = 3
TURN = {"content": "Tell me something.", "temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> Settings:
    require_redis()
    return make_settings(
        tiny_checkpoint,
        api_keys=["key-a", "key-b", "key-c"],
        max_sessions_per_key=MAX_SESSIONS,
        # A few turns' worth: a turn reserves its worst case (8 tokens of the longest piece), then settles.
        max_stored_bytes_per_key=12_000,
        rate_limit_per_minute=0,
    )


@pytest.fixture(scope="module")
def base_url(settings: Settings) -> Iterator[str]:
    with serving(settings) as url:
        yield url


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    yield client
    client.close()


def stored_bytes(store: redis.Redis, prefix: str, session_ids: list[str]) -> int:
    """What the sessions really hold in Redis: token ids, message JSON and stored Responses objects."""
    total = 0
    for sid in session_ids:
        total += store.strlen(f"{prefix}chat:{{{sid}}}:ids")
        total += sum(len(m) for m in store.lrange(f"{prefix}chat:{{{sid}}}:msgs", 0, -1))
        total += sum(len(r) for r in store.hvals(f"{prefix}chat:{{{sid}}}:resp"))
    return total


def owner_of(store: redis.Redis, prefix: str, session_id: str) -> str:
    return store.hget(f"{prefix}chat:{{{session_id}}}:meta", "owner").decode()


def assert_quota_exceeded(response: httpx.Response) -> None:
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "quota_exceeded"


def test_sessions_per_key_refuse_cleanly_and_free_up(
    base_url: str, settings: Settings, store: redis.Redis
) -> None:
    with httpx.Client(base_url=base_url, headers=KEY_A) as http:
        sessions = [http.post("/v1/sessions").json()["session_id"] for _ in range(MAX_SESSIONS)]
        assert_quota_exceeded(http.post("/v1/sessions"))
        assert httpx.post(f"{base_url}/v1/sessions", headers=KEY_B).status_code == 201  # others unaffected
        for sid in sessions:  # nothing lost: every session is still there and usable
            assert http.get(f"/v1/sessions/{sid}").status_code == 200
        assert http.delete(f"/v1/sessions/{sessions[0]}").status_code == 204
        sessions[0] = http.post("/v1/sessions").json()["session_id"]
        # A session that expired (its keys gone, as its TTL would do) stops counting.
        store.delete(f"{settings.redis_key_prefix}chat:{{{sessions[1]}}}:meta")
        assert http.post("/v1/sessions").status_code == 201
        assert_quota_exceeded(http.post("/v1/sessions"))


def test_concurrent_creations_cannot_pass_the_limit_together(base_url: str) -> None:
    headers = {"Authorization": "Bearer key-c"}
    with ThreadPoolExecutor(12) as pool:
        statuses = list(
            pool.map(lambda _: httpx.post(f"{base_url}/v1/sessions", headers=headers).status_code, range(12))
        )
    assert sorted(statuses) == [201] * MAX_SESSIONS + [409] * (12 - MAX_SESSIONS)


def test_stored_bytes_refuse_a_turn_before_work_and_lose_nothing(
    base_url: str, settings: Settings, store: redis.Redis
) -> None:
    prefix = settings.redis_key_prefix
    with httpx.Client(base_url=base_url, headers=KEY_B) as http:
        sid = http.post("/v1/sessions").json()["session_id"]
        replies = []
        while (turn := http.post(f"/v1/sessions/{sid}/messages", json=TURN)).status_code == 200:
            replies.append(turn.json()["message"]["content"])
            assert len(replies) < 100, "the byte quota never refused a turn"
        assert_quota_exceeded(turn)
        assert replies, "not even one turn fitted: the test's quota is too small"
        # Nothing of the refused turn was stored, and everything before it is intact.
        messages = http.get(f"/v1/sessions/{sid}").json()["messages"]
        assert [m["content"] for m in messages[1::2]] == replies
        # The ledger holds exactly what the key stores (its other session is empty so far).
        owner = owner_of(store, prefix, sid)
        ledger = int(store.get(f"{prefix}quota:{{{owner}}}:bytes"))
        all_sessions = [s.decode() for s in store.hkeys(f"{prefix}quota:{{{owner}}}:sessions")]
        assert ledger == stored_bytes(store, prefix, all_sessions) <= settings.max_stored_bytes_per_key
        # Deleting frees its bytes: turns go through again.
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        assert int(store.get(f"{prefix}quota:{{{owner}}}:bytes")) == 0
        sid = http.post("/v1/sessions").json()["session_id"]
        assert http.post(f"/v1/sessions/{sid}/messages", json=TURN).status_code == 200
        assert json.loads(store.lindex(f"{prefix}chat:{{{sid}}}:msgs", 0))["content"] == TURN["content"]
