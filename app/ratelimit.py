"""Per-key rate limit: turns, new sessions and history reads per minute, one budget per caller.

What is metered is what costs: a turn (model time), a new session (Redis memory) and a read of
conversations (Redis and network time, growing with the history): POSTs everywhere, GETs on the session
and Conversations routers. Deletes and the model list are cheap and are not. A caller is its API key (the
owner digest); with no API_KEYS set, where everyone is "anonymous", it is the client address instead, so
one noisy client cannot use up everyone's budget.

The budget lives in Redis, not in the process: two replicas behind a load balancer must not double a
key's allowance, and the app holds no per-caller memory that a flood of callers could grow. It is GCRA
(the generic cell rate algorithm): one key per caller holding its "theoretical arrival time", so a
caller may burst up to RATE_LIMIT_PER_MINUTE at once and then one request every 60 / limit seconds.
The script reads Redis's own clock, so replicas with skewed clocks still agree.

The client address is the socket's peer, or the `X-Forwarded-For` of a proxy listed in TRUSTED_PROXY_IPS
(uvicorn rewrites it, app/protocols.py): no one else can choose the address they are counted under.
"""

from __future__ import annotations

import math

from fastapi import Depends, Request
from redis import exceptions as redis_errors

from app.auth import ANONYMOUS
from app.deps import OwnerDep
from app.errors import ServiceError, StoreUnavailable
from app.metrics import Metrics
from app.store.redis_client import RedisClient

# KEYS: the caller's key. ARGV: interval_ms (60000 / limit), burst_ms (limit * interval).
# -> 0 when allowed (and recorded), else the milliseconds until the next request would be.
# Integers in milliseconds throughout: Lua numbers turn into strings with 14 significant digits, which a
# millisecond clock (13 digits) survives and a microsecond clock would not.
_GCRA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - burst - now
if wait > 0 then return wait end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', new_tat - now)
return 0
"""

# Requests a route may meter; the others on a metered router pass free.
METERED_METHODS = frozenset({"POST"})


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"

    def __init__(self, per_minute: int, retry_after: int) -> None:
        super().__init__(
            f"this API key is over its rate limit of {per_minute} turns and new sessions per minute: "
            f"retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def caller_identity(owner: str, client_host: str | None) -> str:
    """The key whose budget a request spends: its owner, or its address when the API is open."""
    if owner != ANONYMOUS:
        return owner
    return f"ip:{client_host or 'unknown'}"


class RateLimiter:
    """GCRA over Redis; `check()` spends one request of a caller's budget or raises RateLimited."""

    def __init__(
        self, redis: RedisClient, *, prefix: str, per_minute: int, retry_after: int, metrics: Metrics
    ) -> None:
        if per_minute < 0:
            raise ValueError(f"per_minute must be >= 0 (0 turns the limit off), got {per_minute}")
        self.per_minute = per_minute
        self._prefix = prefix
        self._retry_after = retry_after
        self._metrics = metrics
        # Rounded up to whole milliseconds: the limit is never exceeded, only (at odd limits) undershot
        # by less than a millisecond per request.
        self._interval_ms = math.ceil(60_000 / per_minute) if per_minute else 0
        self._script = redis.register_script(_GCRA) if per_minute else None

    @property
    def enabled(self) -> bool:
        return self._script is not None

    def key(self, identity: str) -> str:
        return f"{self._prefix}ratelimit:{identity}"

    async def check(self, identity: str) -> None:
        """Spend one request of `identity`'s budget: RateLimited (429) when it has none left,
        StoreUnavailable (503) when Redis does not answer (the request could not be served anyway)."""
        if self._script is None:
            return
        try:
            wait_ms = int(
                await self._script(
                    keys=[self.key(identity)], args=[self._interval_ms, self._interval_ms * self.per_minute]
                )
            )
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            self._metrics.redis_errors.labels("rate_limit").inc()
            raise StoreUnavailable(
                f"the conversation store is unavailable ({type(exc).__name__}); retry shortly",
                retry_after=self._retry_after,
            ) from exc
        if wait_ms > 0:
            raise RateLimited(self.per_minute, retry_after=max(1, math.ceil(wait_ms / 1000)))


async def _spend(request: Request, owner: str) -> None:
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check(caller_identity(owner, request.client.host if request.client else None))


async def rate_limited(request: Request, owner: OwnerDep) -> None:
    """Router dependency: meter the router's creating requests (after auth, so a bad key is a 401
    that spends nothing and touches no Redis)."""
    if request.method in METERED_METHODS:
        await _spend(request, owner)


async def read_metered(request: Request, owner: OwnerDep) -> None:
    """Router dependency for routers whose reads cost (a session's history, by page or whole, its export,
    the list of sessions; the Conversations API's items): every GET spends one request of the same
    budget, whatever its size, so repeated history reads cannot keep Redis and the server busy."""
    if request.method == "GET":
        await _spend(request, owner)


RateLimitDep = Depends(rate_limited)
ReadRateLimitDep = Depends(read_metered)
