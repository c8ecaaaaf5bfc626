"""Redis Cluster: choosing the cluster client, one slot per conversation, and the service on a real cluster.

The store's own tests (tests/app/store/test_sessions.py) already run against the cluster; these cover what is
specific to it: REDIS_CLUSTER and `redis+cluster://` select redis-py's cluster client, every key of a
conversation hashes to one slot whatever the prefix or session id, conversations really spread over the
masters, and the whole service (lifespan, readiness, turns, history) runs on the cluster.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.crc import key_slot

from app.config import Settings
from app.deps import valid_session_id
from app.metrics import Metrics
from app.store.redis_client import RedisTarget, connect_redis, resolve_redis_target
from app.store.sessions import SessionStore, new_session_id
from tests.deploy.redis_cluster import ClusterInfo
from tests.support import make_settings, new_prefix, quiet_params, running_server

PARTS = ("meta", "msgs", "ids", "lock", "snap")


def _store(prefix: str) -> SessionStore:
    """A store whose keys are only computed, never sent: no server is needed to name them."""
    client = Redis()  # never connects: no command is issued
    return SessionStore(
        client, prefix=prefix, ttl_seconds=60, lock_seconds=5, retry_after=1, metrics=Metrics()
    )


# No deadline: the machine is shared, and a wall-clock limit would make this flaky, not stricter.
@hypothesis_settings(deadline=None, max_examples=200)
@given(
    prefix=st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=20),
    session_id=st.one_of(
        st.builds(lambda _: new_session_id(), st.none()),
        st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True),
    ),
)
def test_every_key_of_a_conversation_hashes_to_one_slot(prefix: str, session_id: str) -> None:
    """For any prefix Settings accepts and any session id the routes accept (an empty `{}` tag, which
    Redis ignores, cannot occur: ids are never empty and have no braces), all its keys share a slot."""
    assert valid_session_id(session_id) == session_id
    store = _store(prefix)
    slots = {key_slot(store.key(session_id, part).encode()) for part in PARTS}
    assert len(slots) == 1


def test_the_cluster_setting_or_url_scheme_selects_the_cluster_client() -> None:
    cases = {
        ("redis://h:7000", False): RedisTarget("redis://h:7000", cluster=False),
        ("redis://h:7000/0", True): RedisTarget("redis://h:7000/0", cluster=True),
        ("redis+cluster://h:7000", False): RedisTarget("redis://h:7000", cluster=True),
        ("rediss+cluster://u:p@h:7000", False): RedisTarget("rediss://u:p@h:7000", cluster=True),
        ("unix:///tmp/r.sock", False): RedisTarget("unix:///tmp/r.sock", cluster=False),
    }
    for (url, cluster), expected in cases.items():
        assert resolve_redis_target(url, cluster=cluster) == expected
    assert isinstance(connect_redis(RedisTarget("redis://h:7000", cluster=True), timeout=1), RedisCluster)
    assert type(connect_redis(RedisTarget("redis://h:7000", cluster=False), timeout=1)) is Redis


def test_cluster_settings_that_cannot_work_are_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="REDIS_CLUSTER=true needs REDIS_URL"):
        Settings(_env_file=None, redis_cluster=True)
    with pytest.raises(ValidationError, match=r"only database 0.*drop the '/3'"):
        Settings(_env_file=None, redis_url="redis+cluster://h:7000/3")
    with pytest.raises(ValidationError, match="TCP seed node"):
        Settings(_env_file=None, redis_url="unix:///tmp/r.sock", redis_cluster=True)
    settings = Settings(_env_file=None, redis_url="redis+cluster://h:7000")
    assert settings.redis_target == RedisTarget("redis://h:7000", cluster=True)


def test_conversations_spread_over_the_masters(redis_cluster: ClusterInfo) -> None:
    """With 12 sessions on 3 masters, all on one node would mean the hash tag is not the session id
    (chance under 1e-5 otherwise); each session's keys must sit on the node that owns its tag."""

    async def main() -> set[str]:
        client = connect_redis(resolve_redis_target(redis_cluster.url, cluster=False), timeout=1)
        store = SessionStore(
            client, prefix=new_prefix(), ttl_seconds=60, lock_seconds=5, retry_after=1, metrics=Metrics()
        )
        try:
            nodes = set()
            for _ in range(12):
                sid = (await store.create("alice")).session_id
                async with store.turn_lock(sid, "alice") as lock:
                    await store.append_turn(sid, "alice", lock, new_ids=[1, 2], messages=[])
                node = client.get_node_from_key(store.key(sid, "meta"))
                for part in ("meta", "ids"):
                    # Asked directly (no redirects): the node that owns the tag holds the key itself.
                    assert (
                        await client.execute_command("EXISTS", store.key(sid, part), target_nodes=node) == 1
                    )
                nodes.add(node.name)
            return nodes
        finally:
            await client.aclose()

    assert len(asyncio.run(main())) > 1


def test_the_service_serves_conversations_on_the_cluster(
    redis_cluster: ClusterInfo, tiny_checkpoint: Path
) -> None:
    settings = make_settings(
        tiny_checkpoint,
        redis_url=redis_cluster.plain_url,
        redis_cluster=True,
        snapshot_min_tokens=0,
        snapshot_every_tokens=1,
    )
    with running_server(settings) as url:
        ready = httpx.get(f"{url}/admin/ready")
        assert ready.status_code == 200, ready.text
        session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
        sent = ["Hi there!", "What do you do for fun?"]
        replies = []
        for content in sent:
            body = {"content": content, **quiet_params()}
            response = httpx.post(f"{url}/v1/sessions/{session_id}/messages", json=body, timeout=None)
            assert response.status_code == 200, response.text
            replies.append(response.json()["message"]["content"])
        stored = httpx.get(f"{url}/v1/sessions/{session_id}").json()
        assert [(m["role"], m["content"]) for m in stored["messages"]] == [
            ("user", sent[0]),
            ("assistant", replies[0]),
            ("user", sent[1]),
            ("assistant", replies[1]),
        ]
        # The decode-state snapshot sits on the node that owns the conversation's slot, beside its ids.
        cluster = SyncRedisCluster.from_url(redis_cluster.url.replace("redis+cluster", "redis"))
        snap = f"{settings.redis_key_prefix}chat:{{{session_id}}}:snap"
        node = cluster.get_node_from_key(snap)
        assert node.name == cluster.get_node_from_key(snap.replace(":snap", ":ids")).name
        while not cluster.execute_command("EXISTS", snap, target_nodes=node):
            time.sleep(0.02)  # written in the background after the reply
        assert httpx.delete(f"{url}/v1/sessions/{session_id}").status_code == 204
        assert httpx.get(f"{url}/v1/sessions/{session_id}").status_code == 404
        assert not cluster.execute_command("EXISTS", snap, target_nodes=node)
        cluster.close()
