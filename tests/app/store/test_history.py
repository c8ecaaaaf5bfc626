"""SessionIndex and HistoryStore against a real Redis and a real Redis Cluster: each owner's list holds
exactly its live conversations, once each across pages; history pages and cuts keep ids and token spans."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from app.errors import InvalidRequest, SessionNotFound
from app.store.history import HistoryStore, MessageNotFound
from app.store.index import SessionIndex
from app.store.redis_client import RedisClient
from app.store.sessions import SessionStore, StoredMessage
from tests.app.store.test_sessions import Target, make_store
from tests.deploy.redis_cluster import ClusterInfo, redis_cluster  # noqa: F401 (a session fixture)
from tests.support import TEST_REDIS_URL, new_prefix


@pytest.fixture(params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Target:
    """CI's Redis, or the session's three-master Redis Cluster (as tests/app/test_store.py runs)."""
    if request.param == "redis":
        return Target(TEST_REDIS_URL, request.getfixturevalue("redis_prefix"))
    cluster: ClusterInfo = request.getfixturevalue("redis_cluster")
    return Target(cluster.url, new_prefix())


Body = Callable[[SessionStore, HistoryStore, SessionIndex, RedisClient], Awaitable[None]]


def run(where: Target, body: Body) -> None:
    async def main() -> None:
        store, client = make_store(where)
        history = HistoryStore(client, store)
        index = SessionIndex(client, store, history, where.prefix)
        try:
            await body(store, history, index, client)
        finally:
            await client.aclose()

    asyncio.run(main())


async def new(store: SessionStore, index: SessionIndex, owner: str) -> str:
    sid = (await store.create(owner)).session_id
    await index.add(owner, sid)
    await asyncio.sleep(0.002)  # distinct update times, so the expected order is unambiguous
    return sid


async def walk(index: SessionIndex, owner: str, limit: int) -> list[str]:
    seen, cursor = [], None
    while True:
        page = await index.page(owner, cursor=cursor, limit=limit)
        seen += [info.session_id for info in page.sessions]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


def test_each_owner_lists_its_live_conversations_once_newest_first(backend: Target) -> None:
    async def body(
        store: SessionStore, history: HistoryStore, index: SessionIndex, client: RedisClient
    ) -> None:
        alice = [await new(store, index, "alice") for _ in range(7)]
        bob = [await new(store, index, "bob") for _ in range(2)]
        assert await walk(index, "alice", 3) == alice[::-1]
        assert await walk(index, "bob", 1) == bob[::-1]
        # Deleted and expired conversations disappear, and their entries are pruned.
        await store.delete(alice[2], "alice")
        for key in store._data_keys(alice[4]):
            await client.pexpire(key, 1)
        await asyncio.sleep(0.05)
        expected = [s for s in alice[::-1] if s not in (alice[2], alice[4])]
        assert await walk(index, "alice", 2) == expected
        members = {m.decode() for m in await client.zrange(index.key("alice"), 0, -1)}
        assert members == set(expected)
        # A conversation used again moves to the front.
        await index.touched("alice", alice[0])
        assert (await index.page("alice", limit=1)).sessions[0].session_id == alice[0]
        assert 0 < await client.pttl(index.key("alice")) <= store.ttl_ms
        with pytest.raises(InvalidRequest):
            await index.page("alice", cursor="nonsense")

    run(backend, body)


def messages(*texts: str) -> list[StoredMessage]:
    return [StoredMessage("user", t, "t", tokens=2) for t in texts]


def test_history_pages_by_seq_and_cuts_one_message_with_its_ids(backend: Target) -> None:
    async def body(
        store: SessionStore, history: HistoryStore, index: SessionIndex, client: RedisClient
    ) -> None:
        sid = (await store.create("alice")).session_id
        async with store.turn_lock(sid, "alice") as lock:
            await store.append_turn(
                sid, "alice", lock, new_ids=list(range(20)), messages=messages(*"abcdefghij")
            )
        page = await history.page(sid, "alice", cursor=3, limit=4)
        assert [(m.seq, m.content) for m in page.messages] == [(4, "d"), (5, "e"), (6, "f"), (7, "g")]
        assert page.has_more
        back = await history.page(sid, "alice", cursor=3, limit=5, order="desc")
        assert [m.content for m in back.messages] == ["b", "a"] and not back.has_more
        assert (await history.message(sid, "alice", 10)).content == "j"
        async with store.turn_lock(sid, "alice") as lock:
            assert await history.remove(sid, "alice", lock, 4) == 18
            with pytest.raises(MessageNotFound):
                await history.remove(sid, "alice", lock, 4)
        assert await store.read_ids(sid, 0, 18) == [*range(6), *range(8, 20)]
        rest = await history.page(sid, "alice", limit=20)
        assert [m.seq for m in rest.messages] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
        with pytest.raises(MessageNotFound):
            await history.message(sid, "alice", 4)
        with pytest.raises(SessionNotFound):
            await history.message(sid, "mallory", 5)

    run(backend, body)
