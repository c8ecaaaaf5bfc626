"""SessionStore edges that the main store tests cross without looking: a token-id range in the middle of a
conversation, an empty range, messages stored before `seq` existed, and the operation each Redis failure
is counted under (`reformer_chat_redis_errors_total{operation=...}`, what an operator's alert names), and
the 404 of deleting what is not there naming the session.

Found by mutation testing over app/store/sessions.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from app.chat import _conflict_error
from app.errors import SessionNotFound, StoreUnavailable
from app.metrics import Metrics
from app.store.redis_client import connect_redis, resolve_redis_target
from app.store.sessions import SessionStore, StoredMessage, TurnConflict
from tests.support import TEST_REDIS_URL, free_port


def _store(redis: Redis, prefix: str, metrics: Metrics) -> SessionStore:
    return SessionStore(
        redis, prefix=prefix, ttl_seconds=3600, lock_seconds=30, retry_after=3, metrics=metrics
    )


async def _session_with_ids(store: SessionStore, ids: list[int]) -> str:
    """A new session of "alice" holding one stored turn whose token ids are `ids`."""
    sid = (await store.create("alice")).session_id
    messages = [StoredMessage("user", "hi", "t"), StoredMessage("assistant", "yo", "t", "stop")]
    async with store.turn_lock(sid, "alice") as lock:
        await store.append_turn(sid, "alice", lock, new_ids=ids, messages=messages)
    return sid


def test_token_ids_read_back_exactly_the_range_asked_for(redis_prefix: str) -> None:
    async def main() -> None:
        client = connect_redis(resolve_redis_target(TEST_REDIS_URL, cluster=False), timeout=1)
        store = _store(client, redis_prefix, Metrics())
        try:
            sid = await _session_with_ids(store, [5, 6, 7, 8, 9])
            assert await store.read_ids(sid, 1, 3) == [6, 7]  # not a byte more, not a byte less
            assert await store.read_ids(sid, 0, 1) == [5]
            assert await store.read_ids(sid, 0, 0) == []
            assert await store.read_ids(sid, 3, 3) == []
            with pytest.raises(SessionNotFound, match="no session 'gone' for this API key"):
                await store.delete("gone", "alice")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_message_stored_before_seq_existed_is_numbered_by_its_position() -> None:
    legacy = json.dumps({"role": "user", "content": "old", "created_at": "t"})
    assert StoredMessage.from_json(legacy, position=4) == StoredMessage("user", "old", "t", None, None, 5)
    current = json.dumps({"seq": 9, "tokens": 12, "role": "assistant", "content": "a", "created_at": "t",
                          "finish_reason": "length"})  # fmt: skip
    assert StoredMessage.from_json(current, position=0) == StoredMessage(
        "assistant", "a", "t", "length", 12, 9
    )


def test_a_message_round_trips_with_its_token_count() -> None:
    message = StoredMessage("assistant", "héllo", "t", "stop", tokens=12)
    assert json.loads(message.to_json())["tokens"] == 12
    assert StoredMessage.from_json(message.to_json(), position=0) == StoredMessage(
        "assistant", "héllo", "t", "stop", 12, 1
    )
    assert "tokens" not in json.loads(StoredMessage("user", "hi", "t").to_json())  # None: not written


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("ping", lambda store: store.ping()),
        ("delete", lambda store: store.delete("sid", "alice")),
        ("read_ids", lambda store: store.read_ids("sid", 0, 4)),
        ("renew_lock", lambda store: store.renew_lock("sid", "token")),
    ],
)
def test_a_redis_failure_is_a_503_counted_under_its_operation(
    operation: str, call: Callable[[SessionStore], Awaitable[object]]
) -> None:
    metrics = Metrics()
    store = _store(Redis(port=free_port(), socket_connect_timeout=1), "x:", metrics)  # nothing listens
    with pytest.raises(StoreUnavailable) as unavailable:
        asyncio.run(call(store))  # type: ignore[arg-type]
    assert unavailable.value.headers == {"Retry-After": "3"}
    errors = metrics.registry.get_sample_value("reformer_chat_redis_errors_total", {"operation": operation})
    assert errors == 1


def test_ids_shorter_than_the_lock_reported_are_a_503_conflict_not_a_deleted_session(
    redis_prefix: str,
) -> None:
    """A turn reads the ids its lock counted; if fewer are stored (a rewind or a replica's write raced it),
    the turn must fail as a retryable 503 naming what it expected, not as a deleted session's 404."""

    async def main() -> None:
        client = connect_redis(resolve_redis_target(TEST_REDIS_URL, cluster=False), timeout=1)
        store = _store(client, redis_prefix, Metrics())
        try:
            sid = await _session_with_ids(store, [5, 6, 7])
            with pytest.raises(TurnConflict) as raised:
                await store.read_ids(sid, 1, 5)
            assert not raised.value.deleted
            reason = "its token ids are shorter than the 5 its lock reported"
            assert str(raised.value) == f"session {sid}: turn not stored because {reason}"
            error = _conflict_error(raised.value, sid, retry_after=3)
            assert isinstance(error, StoreUnavailable) and error.status == 503
            assert error.headers == {"Retry-After": "3"}
            assert await store.read_ids(sid, 0, 3) == [5, 6, 7]  # nothing changed
        finally:
            await client.aclose()

    asyncio.run(main())
