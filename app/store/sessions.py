"""SessionStore: the conversation record in Redis.

One conversation is a few keys that share the hash tag `{<session id>}` (so they sit on one Redis Cluster
slot and one Lua script may touch them all):

    {prefix}chat:{<id>}:meta   hash: owner, created_at, updated_at, seq (last message number), rewinds
                               (how often history was cut back), title, metadata (JSON), kind
    {prefix}chat:{<id>}:msgs   list: one JSON object per message, in order of its `seq`
    {prefix}chat:{<id>}:ids    string: the conversation's token ids, little-endian uint32, appended per turn
    {prefix}chat:{<id>}:resp   hash: stored Responses API objects of this conversation, by response id
    {prefix}chat:{<id>}:lock   string: the per-session turn lock (random token, expires unless renewed)
    {prefix}chat:{<id>}:snap   hash: the conversation's decode-state snapshot (app/store/snapshots.py)

The token ids are what rebuilds a decode state, so a turn never re-tokenises history; a string lets a turn
read just the tail it needs (GETRANGE) instead of the whole conversation. Every change is one Lua script,
so no reader ever sees a half turn, and every access slides the TTL of all the data keys. Each turn
slides the snapshot's too, and deleting a conversation deletes its snapshot with it.

Each message is stored as `{"seq": n, "tokens": t, ...}`: `seq` numbers the conversation's messages (1, 2,
... never reused, so it survives deletions and names the message in the OpenAI-style API) and `tokens` is
the length of the message's own span of the ids, so cutting history back knows which ids go with it.
Messages written before these fields existed have neither: their `seq` is their position + 1, and they
cannot be cut out (app/store/history.py refuses). `rewinds` counts the times history was cut back; a cached
decode state remembers the count it was built under, so no replica reuses a state that saw cut text.

The same code runs on one Redis and on a Redis Cluster (app/store/redis_client.py): every script is handed
all the keys it touches in KEYS, and they are always keys of one session, so one hash tag and one slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast

import numpy as np
from redis import exceptions as redis_errors

from app.errors import SessionBusy, SessionNotFound, StoreUnavailable
from app.metrics import Metrics
from app.store.redis_client import RedisClient

logger = logging.getLogger(__name__)

ID_BYTES = 4  # one token id = one little-endian uint32 in the ids string
_ID_DTYPE = "<u4"

# KEYS: meta. ARGV: owner, created_at, ttl_ms, kind, metadata JSON. A script rather than MULTI: the
# metadata never exists without its TTL, and no client needs cluster transactions.
_CREATE = """
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2], 'seq', 0,
  'kind', ARGV[4], 'metadata', ARGV[5])
return redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""

# KEYS: meta, msgs, ids, resp. ARGV: owner, ttl_ms, with_messages ("1"/"0").
# -> false when missing or owned by another key, else {created_at, ids_bytes, messages...}.
_READ = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
local out = {redis.call('HGET', KEYS[1], 'created_at'), redis.call('STRLEN', KEYS[3])}
if ARGV[3] == '1' then
  for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(out, m) end
end
return out
"""

# KEYS: meta, msgs, ids, resp, snap. ARGV: owner. -> 1 deleted, 0 missing or another key's.
_DELETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 1
"""

# KEYS: meta, msgs, ids, resp, lock, snap. ARGV: owner, token, lock_ms, ttl_ms.
# -> {-1} missing or another key's, {-2} locked by someone else, else {ids_bytes, seq, rewinds, messages}.
# `seq` of a conversation written before messages were numbered is its message count (see above).
_LOCK = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {-1} end
if not redis.call('SET', KEYS[5], ARGV[2], 'NX', 'PX', ARGV[3]) then return {-2} end
-- one absolute expiry for every key: a relative PEXPIRE per key can land a millisecond apart
-- (Redis 7.0 does not freeze the clock inside a script); TIME works on every version we run
local now = redis.call('TIME')
local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4])
for i = 1, 4 do redis.call('PEXPIREAT', KEYS[i], at) end
redis.call('PEXPIREAT', KEYS[6], at)
local n = redis.call('LLEN', KEYS[2])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or n)
local rewinds = tonumber(redis.call('HGET', KEYS[1], 'rewinds') or 0)
return {redis.call('STRLEN', KEYS[3]), seq, rewinds, n}
"""

# KEYS: lock. ARGV: token [, lock_ms]. Only the holder may release or extend its lock.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: meta, msgs, ids, resp, lock. ARGV: owner, token, ttl_ms, expected_ids_bytes, expected_seq,
# keep_messages, keep_ids_bytes, new_ids, updated_at, title, response_id, response_json, retitle, msg...
# -> -1 session gone, -2 lock lost, -3 ids or messages changed under us, else the new ids length in bytes.
# keep_messages >= 0 first cuts history back to its first keep_messages messages and keep_ids_bytes of ids
# (a regenerate or an edit), in the same script as the append, so no reader sees the cut without the new
# turn. Each message gets the next seq, written first in its JSON; a title is set once, by the first turn,
# and again when a cut removed the message it came from (retitle "1"). `ids_turn` names the last append to
# the ids (this turn's lock token and the rewind count after it): a snapshot of this turn's state is
# written only while it is unchanged (app/store/snapshots.py).
_APPEND_TURN = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
if redis.call('GET', KEYS[5]) ~= ARGV[2] then return -2 end
local n = redis.call('LLEN', KEYS[2])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or n)
if redis.call('STRLEN', KEYS[3]) ~= tonumber(ARGV[4]) or seq ~= tonumber(ARGV[5]) then return -3 end
local keep = tonumber(ARGV[6])
if keep >= 0 then
  if keep == 0 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, keep - 1) end
  local kept = tonumber(ARGV[7])
  local ids = kept > 0 and redis.call('GETRANGE', KEYS[3], 0, kept - 1) or ''
  redis.call('SET', KEYS[3], ids)
  redis.call('HINCRBY', KEYS[1], 'rewinds', 1)
  if ARGV[13] == '1' then redis.call('HDEL', KEYS[1], 'title') end
end
redis.call('APPEND', KEYS[3], ARGV[8])
for i = 14, #ARGV do
  seq = seq + 1
  redis.call('RPUSH', KEYS[2], '{"seq":' .. seq .. ',' .. string.sub(ARGV[i], 2))
end
local rewinds = redis.call('HGET', KEYS[1], 'rewinds') or '0'
redis.call('HSET', KEYS[1], 'updated_at', ARGV[9], 'seq', seq, 'ids_turn', ARGV[2] .. '/' .. rewinds)
if ARGV[10] ~= '' then redis.call('HSETNX', KEYS[1], 'title', ARGV[10]) end
if ARGV[11] ~= '' then redis.call('HSET', KEYS[4], ARGV[11], ARGV[12]) end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return redis.call('STRLEN', KEYS[3])
"""


def utc_now() -> str:
    """ISO 8601 in UTC with milliseconds: sortable as text and unambiguous for clients."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_session_id() -> str:
    """192 random bits, URL-safe and free of the braces that delimit the key's hash tag."""
    return secrets.token_urlsafe(24)


Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class StoredMessage:
    role: Role
    content: str
    created_at: str
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    tokens: int | None = None  # length of this message's span of the token ids; None: written before
    seq: int = 0  # the message's number in its conversation, set by the store (0: not stored yet)

    def to_json(self) -> str:
        """The stored JSON without `seq` (the append script writes it in front, see the module doc)."""
        data: dict[str, object] = {}
        if self.tokens is not None:
            data["tokens"] = self.tokens
        data.update(role=self.role, content=self.content, created_at=self.created_at)
        if self.finish_reason is not None:
            data["finish_reason"] = self.finish_reason
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str, position: int) -> StoredMessage:
        """A stored message; `position` (0-based) numbers a message stored before `seq` existed."""
        data = json.loads(raw)
        return cls(
            data["role"],
            data["content"],
            data["created_at"],
            data.get("finish_reason"),
            data.get("tokens"),
            data.get("seq", position + 1),
        )


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    created_at: str
    context_tokens: int  # token ids stored so far: what a rebuilt decode state would have seen
    messages: tuple[StoredMessage, ...] = ()


@dataclass(frozen=True)
class TurnLock:
    """Proof of holding a session's turn lock, and the conversation's shape read with it."""

    token: str
    context_tokens: int
    seq: int = 0  # the last message's number
    rewinds: int = 0  # how often history was cut back: a cached state built under another count is stale
    messages: int = 0


@dataclass(frozen=True)
class Rewind:
    """Cut history back to its first `keep_messages` messages and `keep_tokens` token ids."""

    keep_messages: int
    keep_tokens: int
    retitle: bool = False  # the cut removes the first user message, which the title came from


@dataclass(frozen=True)
class StoredResponse:
    """A Responses API object to store with its turn, under its id."""

    response_id: str
    body: str  # JSON


class TurnConflict(RuntimeError):
    """The turn could not be written: the session was deleted, or the lock was lost, meanwhile."""

    def __init__(self, session_id: str, reason: str, *, deleted: bool = False) -> None:
        super().__init__(f"session {session_id}: turn not stored because {reason}")
        self.deleted = deleted


class SessionStore:
    """Async access to conversations; every Redis failure surfaces as StoreUnavailable (503)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str,
        ttl_seconds: int,
        lock_seconds: float,
        retry_after: int,
        metrics: Metrics,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = int(ttl_seconds * 1000)
        self.lock_ms = int(lock_seconds * 1000)
        self._retry_after = retry_after
        self._metrics = metrics
        self._create = redis.register_script(_CREATE)
        self._read = redis.register_script(_READ)
        self._delete = redis.register_script(_DELETE)
        self._lock = redis.register_script(_LOCK)
        self._unlock = redis.register_script(_UNLOCK)
        self._renew = redis.register_script(_RENEW)
        self._append_turn = redis.register_script(_APPEND_TURN)

    @property
    def redis(self) -> RedisClient:
        return self._redis

    def key(self, session_id: str, part: str) -> str:
        return f"{self._prefix}chat:{{{session_id}}}:{part}"

    def _data_keys(self, session_id: str) -> list[str]:
        return [self.key(session_id, part) for part in ("meta", "msgs", "ids", "resp")]

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    @asynccontextmanager
    async def op(self, name: str) -> AsyncIterator[None]:
        """Time one Redis operation and turn "Redis is not answering" into a 503 the client can retry."""
        start = time.perf_counter()
        try:
            yield
        # RedisClusterException is not a RedisError: the cluster client raises it when no node answers.
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            self._metrics.redis_errors.labels(name).inc()
            if isinstance(exc, redis_errors.ResponseError):
                logger.error("redis rejected %s: %s", name, exc)
            else:
                logger.warning("redis unavailable during %s: %s", name, exc)
            raise StoreUnavailable(
                f"the conversation store is unavailable ({type(exc).__name__}); retry shortly",
                retry_after=self._retry_after,
            ) from exc
        finally:
            self._metrics.redis_latency.labels(name).observe(time.perf_counter() - start)

    async def ping(self) -> None:
        async with self.op("ping"):
            await self._redis.ping()

    async def create(
        self,
        owner: str,
        *,
        kind: str = "chat",
        metadata: dict[str, str] | None = None,
        session_id: str | None = None,
    ) -> SessionRecord:
        """A new empty conversation. `kind` "chat" is a conversation its owner sees in their list;
        "responses" holds a chain of Responses API calls made without a conversation (not listed).
        A fresh id unless given one (the quota ledger counts the session before it exists)."""
        session_id = new_session_id() if session_id is None else session_id
        created_at = utc_now()
        async with self.op("create"):
            await self._create(
                keys=[self.key(session_id, "meta")],
                args=[owner, created_at, self._ttl_ms, kind, json.dumps(metadata or {}, ensure_ascii=False)],
            )
        return SessionRecord(session_id, created_at, 0)

    async def get(self, session_id: str, owner: str, *, with_messages: bool = True) -> SessionRecord:
        """The session (sliding its TTL); SessionNotFound when missing or another key's."""
        async with self.op("get"):
            raw = await self._read(
                keys=self._data_keys(session_id), args=[owner, self._ttl_ms, "1" if with_messages else "0"]
            )
        if raw is None:
            raise SessionNotFound(session_id)
        created_at, ids_bytes, *messages = raw
        return SessionRecord(
            session_id,
            created_at.decode(),
            int(ids_bytes) // ID_BYTES,
            tuple(StoredMessage.from_json(m, i) for i, m in enumerate(messages)),
        )

    async def delete(self, session_id: str, owner: str) -> None:
        async with self.op("delete"):
            deleted = await self._delete(
                keys=[*self._data_keys(session_id), self.key(session_id, "snap")], args=[owner]
            )
        if not deleted:
            raise SessionNotFound(session_id)

    async def read_ids(self, session_id: str, start: int, stop: int) -> list[int]:
        """Token ids [start, stop) of the conversation: only the tail a turn has not fed yet."""
        if stop <= start:
            return []
        async with self.op("read_ids"):
            data = await self._redis.getrange(
                self.key(session_id, "ids"), start * ID_BYTES, stop * ID_BYTES - 1
            )
        if len(data) != (stop - start) * ID_BYTES:
            raise TurnConflict(session_id, f"its token ids are shorter than the {stop} its lock reported")
        return np.frombuffer(cast(bytes, data), dtype=_ID_DTYPE).tolist()  # a bytes client

    async def try_lock(self, session_id: str, owner: str, token: str) -> TurnLock | None:
        """Take the session's turn lock. Returns what it read (token count, last seq, rewinds), or None
        when another turn holds the lock (here or on another replica); SessionNotFound when missing or
        another key's."""
        async with self.op("lock"):
            result = [
                int(x)
                for x in await self._lock(
                    keys=[
                        *self._data_keys(session_id),
                        self.key(session_id, "lock"),
                        self.key(session_id, "snap"),
                    ],
                    args=[owner, token, self.lock_ms, self._ttl_ms],
                )
            ]
        if result[0] == -1:
            raise SessionNotFound(session_id)
        if result[0] == -2:
            return None
        ids_bytes, seq, rewinds, messages = result
        return TurnLock(token, ids_bytes // ID_BYTES, seq, rewinds, messages)

    async def renew_lock(self, session_id: str, token: str) -> bool:
        async with self.op("renew_lock"):
            return bool(await self._renew(keys=[self.key(session_id, "lock")], args=[token, self.lock_ms]))

    async def unlock(self, session_id: str, token: str) -> None:
        async with self.op("unlock"):
            await self._unlock(keys=[self.key(session_id, "lock")], args=[token])

    async def append_turn(
        self,
        session_id: str,
        owner: str,
        lock: TurnLock,
        *,
        new_ids: Sequence[int],
        messages: Sequence[StoredMessage],
        rewind: Rewind | None = None,
        title: str = "",
        response: StoredResponse | None = None,
    ) -> int:
        """Append one turn (its messages and token ids) atomically; returns the new token count.

        Only the lock holder may write, and only onto the token count and message number it read when it
        took the lock, so two replicas can never interleave turns even if a lock expired. TurnConflict
        otherwise. `rewind` first cuts history back in the same script; `response` is stored with it.
        """
        ids_blob = np.asarray(new_ids, dtype=_ID_DTYPE).tobytes()
        async with self.op("append_turn"):
            result = int(
                await self._append_turn(
                    keys=[*self._data_keys(session_id), self.key(session_id, "lock")],
                    args=[
                        owner,
                        lock.token,
                        self._ttl_ms,
                        lock.context_tokens * ID_BYTES,
                        lock.seq,
                        -1 if rewind is None else rewind.keep_messages,
                        0 if rewind is None else rewind.keep_tokens * ID_BYTES,
                        ids_blob,
                        utc_now(),
                        title,
                        "" if response is None else response.response_id,
                        "" if response is None else response.body,
                        "1" if rewind is not None and rewind.retitle else "0",
                        *(m.to_json() for m in messages),
                    ],
                )
            )
        reasons = {-1: "the session was deleted", -2: "its turn lock was lost", -3: "its token ids changed"}
        if result in reasons:
            raise TurnConflict(session_id, reasons[result], deleted=result == -1)
        return result // ID_BYTES

    @asynccontextmanager
    async def turn_lock(self, session_id: str, owner: str) -> AsyncIterator[TurnLock]:
        """Hold the session's turn lock for the body; SessionBusy (409) when another turn has it.

        The lock lives in Redis (SET NX PX with a random token, released by a script that checks the
        token), so it serialises turns across replicas; it is renewed while held, so a long generation
        keeps it, and a crashed holder's lock simply expires.
        """
        token = secrets.token_hex(16)
        lock = await self.try_lock(session_id, owner, token)
        if lock is None:
            raise SessionBusy(session_id)
        released = asyncio.Event()
        renewer = asyncio.create_task(self._keep_renewed(session_id, token, released))
        try:
            yield lock
        finally:
            # Not renewer.cancel(): a cancel that lands as a renewal's command completes can be swallowed
            # inside redis-py (asyncio.wait_for on Python 3.11), and the renewer would then run forever
            # with this turn waiting for it; the event ends it after at most the command in flight.
            released.set()
            await renewer
            try:
                await self.unlock(session_id, token)
            except StoreUnavailable:
                logger.warning(
                    "could not release the lock of session %s; it expires in %d ms", session_id, self.lock_ms
                )

    async def _keep_renewed(self, session_id: str, token: str, released: asyncio.Event) -> None:
        while True:
            try:
                async with asyncio.timeout(self.lock_ms / 3000):
                    await released.wait()
                return
            except TimeoutError:
                pass  # a third of the lock's lifetime passed: renew
            try:
                if not await self.renew_lock(session_id, token):
                    logger.warning(
                        "lost the turn lock of session %s; its turn will not be stored", session_id
                    )
                    return
            except StoreUnavailable:
                continue  # keep trying: Redis may come back before the lock would expire
