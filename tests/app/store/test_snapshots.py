"""SnapshotStore against a real Redis and a real Redis Cluster: a snapshot never covers ids that are not
stored, lives in its conversation's slot, never outlives it, and goes when the conversation is deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from redis.crc import key_slot

from app.metrics import Metrics
from app.store.redis_client import RedisClient, connect_redis, resolve_redis_target
from app.store.sessions import SessionStore
from app.store.snapshots import SnapshotStore, StoredSnapshot
from tests.app.store import test_sessions
from tests.app.store.test_sessions import Target, run_with_store, turn
from tests.deploy.redis_cluster import redis_cluster  # noqa: F401 (a session fixture)
from tests.support import RedisServer, new_prefix

target = test_sessions.target  # the same two Redis targets as the session store's tests

IDENTITY = "a" * 64


async def _turn(store: SessionStore, session_id: str, ids: list[int]) -> tuple[str, int]:
    """Store one turn of `ids`; (its lock token, the stored token count)."""
    async with store.turn_lock(session_id, "alice") as lock:
        total = await store.append_turn(session_id, "alice", lock, new_ids=ids, messages=turn("hi", "yo"))
        return lock.token, total


async def _expires_at(client: RedisClient, key: str) -> int:
    """The key's absolute expiry in Unix ms (Redis 7's PEXPIRETIME): comparable across two reads."""
    return int(await client.execute_command("PEXPIRETIME", key))


def test_a_write_lands_only_while_the_ids_are_as_its_turn_left_them(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        snaps = SnapshotStore(store)
        sid = (await store.create("alice")).session_id
        first, total = await _turn(store, sid, [1, 2, 3, 4])
        save = {"identity": IDENTITY, "data": b"state-1"}
        assert await snaps.save(sid, "alice", turn_token=first, tokens=total - 1, **save)
        load = {"identity": IDENTITY, "stored_tokens": total}
        assert await snaps.load(sid, "alice", **load) == StoredSnapshot(total - 1, b"state-1")
        assert not await snaps.save(sid, "mallory", turn_token=first, tokens=1, **save)  # not hers

        second, total = await _turn(store, sid, [5, 6])
        # The first turn's write arrives late: the second turn's ids are stored, so it is dropped.
        assert not await snaps.save(sid, "alice", turn_token=first, tokens=3, identity=IDENTITY, data=b"old")
        assert not await snaps.save(sid, "alice", turn_token=second, tokens=total + 1, **save)  # too long
        assert await snaps.save(sid, "alice", turn_token=second, tokens=total - 1, **{**save, "data": b"s2"})
        found = await snaps.load(sid, "alice", identity=IDENTITY, stored_tokens=total)
        assert found == StoredSnapshot(total - 1, b"s2")
        # A caller whose state already covers as much gets nothing (no 8 MiB transfer for no gain).
        assert await snaps.load(sid, "alice", identity=IDENTITY, stored_tokens=total, held_tokens=5) is None

        # A rewind (issue 15 counts them in the metadata) between the turn and its write: dropped.
        await client.hincrby(store.key(sid, "meta"), "rewinds", 1)
        assert not await snaps.save(sid, "alice", turn_token=second, tokens=total - 1, **save)

    run_with_store(target, body)


def test_a_read_refuses_what_can_no_longer_be_resumed(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        snaps = SnapshotStore(store)
        sid = (await store.create("alice")).session_id
        token, total = await _turn(store, sid, list(range(10)))
        assert await snaps.save(sid, "alice", turn_token=token, tokens=8, identity=IDENTITY, data=b"s")

        # Another checkpoint's: refused but kept (a replica of that checkpoint may still use it).
        assert await snaps.load(sid, "alice", identity="b" * 64, stored_tokens=total) == "foreign"
        assert await client.exists(snaps.key(sid))
        assert await snaps.load(sid, "mallory", identity=IDENTITY, stored_tokens=total) is None

        # Covers more ids than are stored (history was cut back): refused and deleted.
        assert await snaps.load(sid, "alice", identity=IDENTITY, stored_tokens=7) == "too_long"
        assert not await client.exists(snaps.key(sid))

        # Written before a rewind: refused and deleted, even though the count still fits.
        assert await snaps.save(sid, "alice", turn_token=token, tokens=8, identity=IDENTITY, data=b"s")
        await client.hincrby(store.key(sid, "meta"), "rewinds", 1)
        assert await snaps.load(sid, "alice", identity=IDENTITY, stored_tokens=total) == "stale"
        assert await snaps.load(sid, "alice", identity=IDENTITY, stored_tokens=total) is None

    run_with_store(target, body)


def test_the_snapshot_shares_its_conversations_slot_expiry_and_deletion(target: Target) -> None:
    async def body(store: SessionStore, client: RedisClient) -> None:
        snaps = SnapshotStore(store)
        sid = (await store.create("alice")).session_id
        token, _ = await _turn(store, sid, [1, 2, 3])
        meta, snap = store.key(sid, "meta"), snaps.key(sid)
        assert key_slot(snap.encode()) == key_slot(meta.encode())
        await client.pexpire(meta, 50_000)  # the conversation was last touched a while ago
        assert await snaps.save(sid, "alice", turn_token=token, tokens=2, identity=IDENTITY, data=b"s")
        assert 0 < await _expires_at(client, snap) == await _expires_at(client, meta)  # never outlives it
        async with store.turn_lock(sid, "alice"):
            pass  # a turn slides both by the same TTL
        assert await _expires_at(client, snap) == await _expires_at(client, meta)
        assert await client.pttl(snap) > 50_000
        await store.delete(sid, "alice")
        assert not await client.exists(snap)

    run_with_store(target, body)


def test_snapshots_stay_out_of_the_append_only_file(tmp_path: Path) -> None:
    """A snapshot is a cache of what the ids rebuild: with `appendfsync always`, writing megabytes to the
    AOF per turn would stall Redis. After a Redis crash and AOF replay the conversation is whole and its
    snapshot is gone (the next turn rebuilds)."""

    async def write(url: str) -> tuple[str, str]:
        client = connect_redis(resolve_redis_target(url, cluster=False), timeout=5)
        try:
            options = {"ttl_seconds": 3600, "lock_seconds": 30, "retry_after": 1, "metrics": Metrics()}
            store = SessionStore(client, prefix=new_prefix(), **options)
            sid = (await store.create("alice")).session_id
            token, _ = await _turn(store, sid, [1, 2, 3])
            snaps = SnapshotStore(store)
            assert await snaps.save(sid, "alice", turn_token=token, tokens=2, identity=IDENTITY, data=b"s")
            return store.key(sid, "ids"), snaps.key(sid)
        finally:
            await client.aclose()

    with RedisServer(tmp_path / "redis", aof=True) as server:
        ids, snap = asyncio.run(write(server.url))
        with server.client() as client:
            assert client.exists(snap)
        server.kill()
        server.start()
        with server.client() as client:
            assert client.get(ids) == np.asarray([1, 2, 3], dtype="<u4").tobytes()
            assert not client.exists(snap)
