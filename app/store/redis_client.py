"""The Redis client the store talks to: one server, or a Redis Cluster through redis-py's cluster client.

A deployment that outgrows one Redis moves to Redis Cluster, the engine it already runs, without code
changes: REDIS_CLUSTER=true (or a `redis+cluster://` / `rediss+cluster://` URL) makes REDIS_URL the seed
node of a cluster, and redis-py discovers the other nodes and routes each command by its key's slot. The
store keeps every key of one conversation under the `{<session id>}` hash tag, so each of its Lua
scripts touches a single slot, which is all Redis Cluster asks of a script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

RedisClient: TypeAlias = Redis | RedisCluster

# The `+cluster` schemes are ours (redis-py has none): they say "cluster" in the one setting that a
# deployment already has to change when it moves to a cluster.
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@dataclass(frozen=True)
class RedisTarget:
    """Where the store's Redis is and whether it is a cluster: REDIS_URL and REDIS_CLUSTER, resolved."""

    url: str  # with a scheme redis-py understands
    cluster: bool


def resolve_redis_target(url: str, *, cluster: bool) -> RedisTarget:
    """Normalise REDIS_URL + REDIS_CLUSTER; ValueError, naming the fix, for a URL a cluster cannot use."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        cluster = True
        url = f"{_CLUSTER_SCHEMES[scheme]}://{url.split('://', 1)[1]}"
    if not cluster:
        return RedisTarget(url, cluster=False)
    if scheme in ("unix", ""):
        raise ValueError(
            f"Redis Cluster needs a TCP seed node, got {url!r}: use redis://host:port (or redis+cluster://), "
            "or set REDIS_CLUSTER=false for a single server on a unix socket"
        )
    database = parts.path.strip("/")
    if database not in ("", "0"):
        raise ValueError(
            f"Redis Cluster has only database 0, but REDIS_URL names database {database}: drop the "
            f"'/{database}' from the URL (REDIS_KEY_PREFIX keeps deployments apart on a shared cluster)"
        )
    return RedisTarget(url, cluster=True)


def connect_redis(target: RedisTarget, *, timeout: float) -> RedisClient:
    """A client for the target; no connection is made until the first command.

    Short timeouts: a Redis that stopped answering should become a quick 503, not a hung request;
    both clients reconnect on a later command once the server (or, in a cluster, the slot's new
    primary) is back.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
    }
    if target.cluster:
        return RedisCluster.from_url(target.url, **options)
    return Redis.from_url(target.url, **options)
