"""Storage quotas per API key: how many sessions it holds and how many bytes of conversation it stores.

Without them one key could fill Redis (sessions slide their TTL, and Redis runs `noeviction`) and every
other key would get 503. The ledger is per owner, in two keys that share the hash tag `{<owner>}` (one
Redis Cluster slot, so one Lua script may touch both):

    {prefix}quota:{<owner>}:sessions   hash: session id -> bytes stored by that session
    {prefix}quota:{<owner>}:bytes      string: the sum of the hash's values

A session's own keys carry another hash tag (`{<session id>}`), so no script can touch both the ledger
and a session: the ledger is changed first and undone if the session change fails. Every ledger change
is one script, so two replicas creating sessions for one key at the same instant cannot both pass the
limit. What can drift: a session that expires (its TTL) or whose deletion was interrupted stays in the
ledger. That only ever over-counts, and it is corrected when it matters: a refused reservation first
drops the ledger's sessions whose metadata no longer exists, then tries again.

A turn reserves its worst case (the user message, the token ids of prompt and `max_tokens`, the reply's
text at the tokenizer's longest piece, JSON-escaped) before anything is generated, so the quota is never
passed and a refused turn stores nothing; once stored, the reservation is settled to what was written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from redis import exceptions as redis_errors

from app.errors import ServiceError, StoreUnavailable
from app.store.redis_client import RedisClient

logger = logging.getLogger(__name__)

# KEYS: sessions, bytes. ARGV: session id, max sessions (0: no limit). -> 1 added (or already there), 0 full.
_ADD_SESSION = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('HLEN', KEYS[1]) >= limit then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 0)
return 1
"""

# KEYS: sessions, bytes. ARGV: session id, delta bytes, max bytes (0: no limit).
# -> the key's new total, or -1 when a positive delta would pass the limit (nothing changed).
_CHARGE = """
local delta = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if delta > 0 and limit > 0 and total + delta > limit then return -1 end
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if held + delta < 0 then delta = -held end
redis.call('HSET', KEYS[1], ARGV[1], held + delta)
return redis.call('INCRBY', KEYS[2], delta)
"""

# KEYS: sessions, bytes. ARGV: session ids. Drops them and their bytes. -> how many were there.
_RELEASE = """
local dropped = 0
for i = 1, #ARGV do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if held then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('DECRBY', KEYS[2], held)
    dropped = dropped + 1
  end
end
return dropped
"""


class QuotaExceeded(ServiceError):
    status, code = 409, "quota_exceeded"


class StorageQuota:
    """MAX_SESSIONS_PER_KEY and MAX_STORED_BYTES_PER_KEY over Redis; 0 turns a limit off."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str,
        max_sessions: int,
        max_bytes: int,
        retry_after: int,
        session_meta_key: Callable[[str], str],
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._retry_after = retry_after
        self._meta_key = session_meta_key  # session id -> its metadata key in the store
        self._add = redis.register_script(_ADD_SESSION)
        self._charge = redis.register_script(_CHARGE)
        self._release = redis.register_script(_RELEASE)

    @property
    def enabled(self) -> bool:
        return bool(self.max_sessions or self.max_bytes)

    def keys(self, owner: str) -> list[str]:
        return [f"{self._prefix}quota:{{{owner}}}:sessions", f"{self._prefix}quota:{{{owner}}}:bytes"]

    async def _call(self, script: object, owner: str, args: Sequence[object]) -> int:
        try:
            return int(await script(keys=self.keys(owner), args=list(args)))  # type: ignore[operator]
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise StoreUnavailable(
                f"the conversation store is unavailable ({type(exc).__name__}); retry shortly",
                retry_after=self._retry_after,
            ) from exc

    async def add_session(self, owner: str, session_id: str) -> None:
        """Count a new session against the owner's limit; QuotaExceeded when it holds the maximum."""
        if not self.enabled:
            return
        if await self._call(self._add, owner, [session_id, self.max_sessions]):
            return
        if await self.forget_missing(owner) and await self._call(
            self._add, owner, [session_id, self.max_sessions]
        ):
            return
        raise QuotaExceeded(
            f"this API key holds {self.max_sessions} sessions, its limit (MAX_SESSIONS_PER_KEY): delete "
            "one (DELETE /v1/sessions/{id}) or let an idle one expire"
        )

    async def reserve(self, owner: str, session_id: str, size: int) -> None:
        """Reserve `size` bytes for a turn; QuotaExceeded when the key's stored bytes would pass it."""
        if not self.enabled:
            return
        if await self._call(self._charge, owner, [session_id, size, self.max_bytes]) >= 0:
            return
        if await self.forget_missing(owner) and (
            await self._call(self._charge, owner, [session_id, size, self.max_bytes]) >= 0
        ):
            return
        raise QuotaExceeded(
            f"this API key stores close to {self.max_bytes} bytes of conversation, its limit "
            f"(MAX_STORED_BYTES_PER_KEY), and this turn could need {size} more: delete sessions it no "
            "longer needs"
        )

    async def settle(self, owner: str, session_id: str, delta: int) -> None:
        """Give back (negative delta) what a reservation did not use; never refused, never fails a turn."""
        if not self.enabled or delta == 0:
            return
        try:
            await self._call(self._charge, owner, [session_id, delta, 0])
        except StoreUnavailable:
            logger.warning("could not settle the storage quota of a turn; the key's total over-counts")

    async def release(self, owner: str, session_ids: Sequence[str]) -> int:
        """Drop sessions (deleted, expired, or never created) from the owner's ledger."""
        if not self.enabled or not session_ids:
            return 0
        return await self._call(self._release, owner, list(session_ids))

    async def forget_missing(self, owner: str) -> int:
        """Drop the ledger's sessions whose metadata is gone (expired, or a deletion interrupted
        half-way); how many were dropped. Runs only when a limit is reached."""
        try:
            listed = [
                s.decode() if isinstance(s, bytes) else s
                for s in await self._redis.hkeys(self.keys(owner)[0])
            ]
            missing = []
            for start in range(0, len(listed), 500):
                batch = listed[start : start + 500]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for session_id in batch:
                        pipe.exists(self._meta_key(session_id))
                    found = await pipe.execute()
                missing += [s for s, exists in zip(batch, found, strict=True) if not exists]
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise StoreUnavailable(
                f"the conversation store is unavailable ({type(exc).__name__}); retry shortly",
                retry_after=self._retry_after,
            ) from exc
        return await self.release(owner, missing)
