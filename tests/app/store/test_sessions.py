"""SessionStore against a real Redis: ownership, atomic turns, append-only token ids, TTLs, the turn lock.

Every test runs twice: on CI's Redis, and on a real three-master Redis Cluster (tests/deploy/redis_cluster.py)
through the cluster client, where each script must find all its keys on one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from app.errors import SessionBusy, SessionNotFound, StoreUnavailable
from app.metrics import Metrics
from app.store.redis_client import RedisClient, connect_redis, resolve_redis_target
from app.store.sessions import SessionStore, StoredMessage, TurnConflict, TurnLock
from tests.deploy.redis_cluster import ClusterInfo, redis_cluster  # noqa: F401 (a session fixture)
from tests.support import TEST_REDIS_URL, free_port, new_prefix

TTL = 3600


@dataclass(frozen=True)
class Target:
    url: str
    prefix: str


@pytest.fixture(params=["redis", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """CI's Redis under a prefix removed afterwards, or the session's Redis Cluster (torn down at the end)."""
    if request.param == "redis":
        return Target(TEST_REDIS_URL, request.getfixturevalue("redis_prefix"))
    cluster: ClusterInfo = request.getfixturevalue("redis_cluster")
    return Target(cluster.url, new_prefix())


def make_store(target: Target, **kwargs: Any) -> tuple[SessionStore, RedisClient]:
    """A store on the client the app would build for this URL (a redis+cluster:// URL: the cluster one)."""
    client = connect_redis(resolve_redis_target(target.url, cluster=False), timeout=1)
    options = {"ttl_seconds": TTL, "lock_seconds": 30, "retry_after": 3, "metrics": Metrics(), **kwargs}
    return SessionStore(client, prefix=target.prefix, **options), client


def run_with_store(target: Target, body: Callable[[SessionStore, RedisClient], Awaitable[None]]) -> None:
    async def main() -> None:
        store, client = make_store(target)
        try:
            await body(store, client)
        finally:
            await client.aclose()

    asyncio.run(main())


def turn(content: str, reply: str) -> list[StoredMessage]:
    return [StoredMessage("user", content, "t0"), StoredMessage("assistant", reply, "t1", "stop")]


def test_sessions_belong_to_their_owner(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        created = await store.create("alice")
        assert len(created.session_id) >= 22  # >= 128 random bits, URL-safe base64
        record = await store.get(created.session_id, "alice")
        assert (record.created_at, record.context_tokens, record.messages) == (created.created_at, 0, ())
        with pytest.raises(SessionNotFound):
            await store.get(created.session_id, "mallory")
        with pytest.raises(SessionNotFound):
            await store.delete(created.session_id, "mallory")
        await store.delete(created.session_id, "alice")
        with pytest.raises(SessionNotFound):
            await store.get(created.session_id, "alice")
        assert await client.exists(*store._data_keys(created.session_id)) == 0

    run_with_store(target, body)


def test_turns_append_messages_and_token_ids_together(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        sid = (await store.create("alice")).session_id
        async with store.turn_lock(sid, "alice") as lock:
            assert lock.context_tokens == 0
            total = await store.append_turn(
                sid, "alice", lock, new_ids=[7, 8, 9, 70000], messages=turn("hi", "yo")
            )
        assert total == 4
        async with store.turn_lock(sid, "alice") as lock:
            assert lock.context_tokens == 4
            await store.append_turn(sid, "alice", lock, new_ids=[1, 2], messages=turn("and?", "so"))
        record = await store.get(sid, "alice")
        assert record.context_tokens == 6
        assert [(m.role, m.content, m.finish_reason) for m in record.messages] == [
            ("user", "hi", None),
            ("assistant", "yo", "stop"),
            ("user", "and?", None),
            ("assistant", "so", "stop"),
        ]
        # Append-only: the first turn's ids are untouched, and any tail can be read on its own.
        assert await store.read_ids(sid, 0, 6) == [7, 8, 9, 70000, 1, 2]
        assert await store.read_ids(sid, 4, 6) == [1, 2]
        assert await store.read_ids(sid, 6, 6) == []

    run_with_store(target, body)


def test_a_turn_is_refused_when_the_lock_is_not_held_or_the_ids_moved(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        sid = (await store.create("alice")).session_id
        with pytest.raises(TurnConflict, match="lock"):
            await store.append_turn(sid, "alice", TurnLock("not-the-token", 0), new_ids=[1], messages=[])
        async with store.turn_lock(sid, "alice") as lock:
            with pytest.raises(TurnConflict, match="token ids changed"):
                await store.append_turn(
                    sid, "alice", replace(lock, context_tokens=5), new_ids=[1], messages=[]
                )
            await store.delete(sid, "alice")
            with pytest.raises(TurnConflict) as deleted:
                await store.append_turn(sid, "alice", lock, new_ids=[1], messages=[])
            assert deleted.value.deleted
        # Nothing was written by any refused turn: the deleted session left no keys behind.
        assert await client.exists(*store._data_keys(sid)) == 0

    run_with_store(target, body)


def test_the_lock_holds_across_replicas_and_is_released(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        other, other_client = make_store(target)  # a second replica: its own client and store
        try:
            sid = (await store.create("alice")).session_id
            async with store.turn_lock(sid, "alice"):
                with pytest.raises(SessionBusy):
                    async with other.turn_lock(sid, "alice"):
                        pass
            async with other.turn_lock(sid, "alice") as lock:
                assert lock.context_tokens == 0
            with pytest.raises(SessionNotFound):
                async with other.turn_lock(sid, "mallory"):
                    pass
            assert await client.exists(store.key(sid, "lock")) == 0
        finally:
            await other_client.aclose()

    run_with_store(target, body)


def test_only_the_holder_can_renew_or_release_the_lock(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        sid = (await store.create("alice")).session_id
        lock_key = store.key(sid, "lock")
        taken = await store.try_lock(sid, "alice", "mine")
        assert taken is not None and taken.context_tokens == 0
        await client.pexpire(lock_key, 500)
        assert not await store.renew_lock(sid, "theirs")
        assert await client.pttl(lock_key) <= 500
        assert await store.renew_lock(sid, "mine")
        assert await client.pttl(lock_key) > 500
        await store.unlock(sid, "theirs")
        assert await client.get(lock_key) == b"mine"
        await store.unlock(sid, "mine")
        assert await client.exists(lock_key) == 0

    run_with_store(target, body)


def test_every_access_slides_the_ttl_of_all_keys(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        sid = (await store.create("alice")).session_id
        async with store.turn_lock(sid, "alice") as lock:
            await store.append_turn(sid, "alice", lock, new_ids=[1], messages=turn("a", "b"))
        keys = store._data_keys(sid)[:3]  # the fourth, stored Responses API objects, exists once one is
        for key in keys:
            assert 0 < await client.pttl(key) <= TTL * 1000
            await client.pexpire(key, 5000)
        await store.get(sid, "alice")
        for key in keys:
            assert await client.pttl(key) > 5000

    run_with_store(target, body)


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_unreachable_redis_is_store_unavailable_with_retry_after(scheme: str) -> None:
    async def main() -> None:
        metrics = Metrics()
        store, client = make_store(
            Target(f"{scheme}://127.0.0.1:{free_port()}", "test:down:"), metrics=metrics
        )
        try:
            for call in (store.ping(), store.create("alice"), store.get("x" * 22, "alice")):
                with pytest.raises(StoreUnavailable) as error:
                    await call
                assert error.value.status == 503 and error.value.headers["Retry-After"] == "3"
        finally:
            await client.aclose()
        assert metrics.redis_errors.labels("create")._value.get() == 1

    asyncio.run(main())


def test_releasing_the_lock_never_waits_on_a_renewal_that_swallowed_its_cancel(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14's lost reply: a turn's release cancelled its renewer while a renewal's command was
    completing; asyncio.wait_for inside redis-py (Python 3.11) can swallow that cancel, the renewer ran
    on forever and the turn never got past its release to send `done`. Injected here: a renewal that
    swallows a cancel as that race does. The release must finish before any later renewal starts."""
    real_renew = SessionStore.renew_lock
    in_flight, renewed_again = asyncio.Event(), asyncio.Event()
    calls = 0

    async def renew_swallowing_cancel(self: SessionStore, session_id: str, token: str) -> bool:
        nonlocal calls
        calls += 1
        if calls > 1:
            renewed_again.set()
        in_flight.set()
        with contextlib.suppress(asyncio.CancelledError):  # what the race inside redis-py does
            await asyncio.sleep(0.05)  # the command in flight when the turn ends
        return await real_renew(self, session_id, token)

    monkeypatch.setattr(SessionStore, "renew_lock", renew_swallowing_cancel)

    async def main() -> None:
        store, client = make_store(Target(TEST_REDIS_URL, redis_prefix), lock_seconds=0.3)
        try:
            sid = (await store.create("alice")).session_id
            release = asyncio.Event()

            async def hold() -> None:
                async with store.turn_lock(sid, "alice"):
                    await release.wait()

            holder = asyncio.create_task(hold())
            await in_flight.wait()  # a renewal is in flight: end the turn now
            release.set()
            await asyncio.wait(
                {holder, asyncio.create_task(renewed_again.wait())}, return_when="FIRST_COMPLETED"
            )
            assert holder.done(), "the turn is still waiting for its renewer after releasing the lock"
            async with store.turn_lock(sid, "alice"):  # and the lock is free again
                pass
        finally:
            await client.aclose()

    asyncio.run(main())
