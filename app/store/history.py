"""HistoryStore: a conversation's messages by page and by number, cutting them back, its metadata, and
its stored Responses API objects.

Same records as app/store/sessions.py (read its module doc first): messages are found by their `seq`
with a binary search over the list (LINDEX), so a page of a 10,000-message conversation reads O(log n)
messages plus the page, never the whole list. Every script is handed keys of one session only (one
Cluster slot) and checks the owner first, so another key's conversation reads as missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from app.errors import InvalidRequest, ServiceError, SessionNotFound
from app.store.redis_client import RedisClient
from app.store.sessions import ID_BYTES, Rewind, SessionStore, StoredMessage, TurnLock, utc_now

# Lua: the seq of message i (0-based) of KEYS[2]; a message stored before numbering is its position + 1.
# first_above(x): the first index whose seq is > x (n when none), by binary search: seqs only grow.
_SEARCH = """
local n = redis.call('LLEN', KEYS[2])
local function seq_at(i)
  local s = string.match(redis.call('LINDEX', KEYS[2], i), '^{"seq":(%d+)')
  return s and tonumber(s) or i + 1
end
local function first_above(x)
  local lo, hi = 0, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if seq_at(mid) > x then hi = mid else lo = mid + 1 end
  end
  return lo
end
"""

# KEYS: meta, msgs, ids, resp. ARGV: owner, ttl_ms, cursor seq (0: none), limit, order.
# -> false when missing or another key's, else {index of the first message returned, ids_bytes,
# messages...}: up to limit + 1 messages after the cursor (asc) or before it (desc, returned oldest
# first), so the caller knows whether there are more.
_PAGE = (
    """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
"""
    + _SEARCH
    + """
local cursor, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local start, stop
if ARGV[5] == 'asc' then
  start = first_above(cursor)
  stop = start + limit
else
  stop = (cursor == 0) and n - 1 or first_above(cursor - 1) - 1
  start = math.max(0, stop - limit)
end
local out = {start, redis.call('STRLEN', KEYS[3])}
if stop >= start then
  for _, m in ipairs(redis.call('LRANGE', KEYS[2], start, stop)) do table.insert(out, m) end
end
return out
"""
)

# KEYS: meta, msgs, ids, resp, lock. ARGV: owner, token, ttl_ms, seq, updated_at.
# -> -1 missing or another key's, -2 lock not held, -4 no such message, -5 stored before token spans,
# else the new ids length in bytes. Cuts the message's span out of the ids and counts a rewind.
_REMOVE = (
    """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
if redis.call('GET', KEYS[5]) ~= ARGV[2] then return -2 end
"""
    + _SEARCH
    + """
local seq = tonumber(ARGV[4])
local i = first_above(seq - 1)
if i >= n or seq_at(i) ~= seq then return -4 end
local function span(m) return tonumber(string.match(m, '^{"seq":%d+,"tokens":(%d+)')) end
local own = span(redis.call('LINDEX', KEYS[2], i))
if not own then return -5 end
local after = 0
for _, m in ipairs(redis.call('LRANGE', KEYS[2], i + 1, -1)) do
  local t = span(m)
  if not t then return -5 end
  after = after + t
end
local stop = redis.call('STRLEN', KEYS[3]) - 4 * after
local start = stop - 4 * own
local head = start > 0 and redis.call('GETRANGE', KEYS[3], 0, start - 1) or ''
redis.call('SET', KEYS[3], head .. redis.call('GETRANGE', KEYS[3], stop, -1))
redis.call('LSET', KEYS[2], i, '')
redis.call('LREM', KEYS[2], 1, '')
redis.call('HINCRBY', KEYS[1], 'rewinds', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ARGV[3]) end
return redis.call('STRLEN', KEYS[3])
"""
)

# KEYS: meta, msgs, ids, resp. ARGV: owner, ttl_ms (0: a listing, which must not keep it alive), metadata
# JSON ("" to leave it). -> false when missing or another key's, else {created_at, updated_at, metadata,
# title, kind, messages, ids_bytes}.
_INFO = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
if ARGV[2] ~= '0' then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'metadata', ARGV[3]) end
local f = redis.call('HMGET', KEYS[1], 'created_at', 'updated_at', 'metadata', 'title', 'kind')
return {f[1], f[2] or f[1], f[3] or '{}', f[4] or '', f[5] or 'chat', redis.call('LLEN', KEYS[2]),
  redis.call('STRLEN', KEYS[3])}
"""

# KEYS: meta, resp. ARGV: owner, response id, delete ("1"/"0"). -> false when missing, else its JSON.
_RESPONSE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
local body = redis.call('HGET', KEYS[2], ARGV[2])
if body and ARGV[3] == '1' then redis.call('HDEL', KEYS[2], ARGV[2]) end
return body
"""

Order = Literal["asc", "desc"]
RewindTarget = Literal["last_reply", "last_user"]


class MessageNotFound(ServiceError):
    status, code = 404, "message_not_found"

    def __init__(self, session_id: str, seq: int) -> None:
        super().__init__(f"no message {seq} in conversation {session_id!r}")


@dataclass(frozen=True)
class Page:
    messages: tuple[StoredMessage, ...]  # in the order asked for
    has_more: bool
    context_tokens: int  # of the whole conversation


@dataclass(frozen=True)
class ConversationInfo:
    session_id: str
    created_at: str
    updated_at: str
    metadata: dict[str, str]
    title: str
    kind: str
    messages: int
    context_tokens: int


class HistoryStore:
    """Reads and cuts of stored conversations; every Redis failure is StoreUnavailable, as in the store."""

    def __init__(self, redis: RedisClient, store: SessionStore) -> None:
        self._redis = redis
        self._store = store
        self._page = redis.register_script(_PAGE)
        self._remove = redis.register_script(_REMOVE)
        self._info = redis.register_script(_INFO)
        self._response = redis.register_script(_RESPONSE)

    def _keys(self, session_id: str) -> list[str]:
        return [self._store.key(session_id, part) for part in ("meta", "msgs", "ids", "resp")]

    async def page(
        self, session_id: str, owner: str, *, cursor: int = 0, limit: int = 20, order: Order = "asc"
    ) -> Page:
        """Up to `limit` messages after message number `cursor` (asc) or before it (desc; 0: from the end)."""
        async with self._store.op("page"):
            raw = await self._page(
                keys=self._keys(session_id), args=[owner, self._store.ttl_ms, cursor, limit, order]
            )
        if raw is None:
            raise SessionNotFound(session_id)
        start, ids_bytes, *items = raw
        messages = [StoredMessage.from_json(m, int(start) + j) for j, m in enumerate(items)]
        if order == "desc":
            messages.reverse()
        return Page(tuple(messages[:limit]), len(messages) > limit, int(ids_bytes) // ID_BYTES)

    async def message(self, session_id: str, owner: str, seq: int) -> StoredMessage:
        page = await self.page(session_id, owner, cursor=seq - 1, limit=1)
        if not page.messages or page.messages[0].seq != seq:
            raise MessageNotFound(session_id, seq)
        return page.messages[0]

    async def info(
        self,
        session_id: str,
        owner: str,
        *,
        metadata: dict[str, str] | None = None,
        slide: bool = True,
    ) -> ConversationInfo:
        """The conversation's header (setting its metadata first when given); slides its TTL unless
        `slide` is False (a listing looks without keeping conversations alive)."""
        update = "" if metadata is None else json.dumps(metadata, ensure_ascii=False)
        ttl = self._store.ttl_ms if slide else 0
        async with self._store.op("info"):
            raw = await self._info(keys=self._keys(session_id), args=[owner, ttl, update])
        if raw is None:
            raise SessionNotFound(session_id)
        return _info(session_id, raw)

    async def remove(self, session_id: str, owner: str, lock: TurnLock, seq: int) -> int:
        """Cut message `seq` and its token ids out (under the caller's turn lock); the new token count."""
        async with self._store.op("remove"):
            result = int(
                await self._remove(
                    keys=[*self._keys(session_id), self._store.key(session_id, "lock")],
                    args=[owner, lock.token, self._store.ttl_ms, seq, utc_now()],
                )
            )
        if result == -1:
            raise SessionNotFound(session_id)
        if result == -4:
            raise MessageNotFound(session_id, seq)
        if result == -5:
            raise _predates_spans()
        if result < 0:
            raise SessionNotFound(session_id)  # the lock expired under us: as if deleted meanwhile
        return result // ID_BYTES

    async def plan_rewind(self, session_id: str, lock: TurnLock, target: RewindTarget) -> Rewind:
        """Where a regenerate ("last_reply": drop the last message, a reply) or an edit ("last_user": drop
        the last user message and all after it) cuts history back to, read under the turn lock."""
        async with self._store.op("tail"):
            raw = await self._redis.lrange(self._store.key(session_id, "msgs"), -16, -1)
        tail = [StoredMessage.from_json(m, lock.messages - len(raw) + j) for j, m in enumerate(raw)]
        if target == "last_reply":
            if not tail or tail[-1].role != "assistant":
                raise InvalidRequest("the conversation does not end with a reply: nothing to regenerate")
            cut = tail[-1:]
        else:
            users = [j for j, m in enumerate(tail) if m.role == "user"]
            if not users:
                raise InvalidRequest("no user message at the end of the conversation to edit")
            cut = tail[users[-1] :]
        if any(m.tokens is None for m in cut):
            raise _predates_spans()
        # The title came from the first user message: retitle when the cut leaves none before it (known
        # exactly when the tail read is the whole conversation; a longer one keeps its title).
        kept = tail[: len(tail) - len(cut)]
        retitle = len(tail) == lock.messages and not any(m.role == "user" for m in kept)
        return Rewind(
            lock.messages - len(cut), lock.context_tokens - sum(m.tokens or 0 for m in cut), retitle
        )

    async def prefix(
        self, session_id: str, owner: str, last_seq: int
    ) -> tuple[tuple[StoredMessage, ...], int]:
        """The messages up to and including `last_seq`, and how many token ids they span (a branch from an
        earlier response starts from these)."""
        async with self._store.op("prefix"):
            raw = await self._page(
                keys=self._keys(session_id), args=[owner, self._store.ttl_ms, 0, 1 << 30, "asc"]
            )
        if raw is None:
            raise SessionNotFound(session_id)
        start, _, *items = raw
        messages = [StoredMessage.from_json(m, int(start) + j) for j, m in enumerate(items)]
        kept = tuple(m for m in messages if m.seq <= last_seq)
        if any(m.tokens is None for m in kept):
            raise _predates_spans()
        return kept, sum(m.tokens or 0 for m in kept)

    async def response(self, session_id: str, owner: str, response_id: str, *, delete: bool = False) -> str:
        """A stored Responses API object's JSON (deleting it when asked); SessionNotFound when absent."""
        async with self._store.op("response"):
            body = await self._response(
                keys=[self._store.key(session_id, "meta"), self._store.key(session_id, "resp")],
                args=[owner, response_id, "1" if delete else "0"],
            )
        if body is None:
            raise SessionNotFound(session_id)
        return body.decode() if isinstance(body, bytes) else body


def _info(session_id: str, raw: list[bytes | int]) -> ConversationInfo:
    created, updated, metadata, title, kind, messages, ids_bytes = raw
    return ConversationInfo(
        session_id,
        _text(created),
        _text(updated),
        json.loads(_text(metadata)),
        _text(title),
        _text(kind),
        int(messages),
        int(ids_bytes) // ID_BYTES,
    )


def _text(value: bytes | int | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _predates_spans() -> InvalidRequest:
    return InvalidRequest(
        "this message was stored before messages kept their token counts, so it cannot be cut out; "
        "start a new conversation to edit it"
    )
