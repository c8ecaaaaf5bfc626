"""SnapshotStore: a conversation's decode-state snapshot in Redis, beside the conversation.

    {prefix}chat:{<id>}:snap   hash: tokens, rewinds, identity, data

`data` is model/snapshot.py's bytes; the other fields repeat what the scripts must check without parsing
them: `tokens` (the snapshot covers the conversation's first `tokens` ids), `identity` (the checkpoint
that computed it) and `rewinds` (the conversation's rewind count when it was written). The key shares the
conversation's hash tag, so it lives in the conversation's Redis Cluster slot and the scripts below read
the conversation's keys and write the snapshot atomically.

The promise: a snapshot never covers a token that is not in the stored ids. A write is accepted only
while the ids are exactly as the turn that computed the state left them (the `ids_turn` mark that
SessionStore.append_turn sets: that turn's lock token and the rewind count), so a later turn, or a rewind,
that landed first wins. A read hands back a snapshot only when it covers at most the ids stored now and
no rewind happened since it was written; one that fails either check is useless forever and is deleted.
A read checks in one script and fetches the bytes with a plain HGET (a write landing in between can only
be a valid one for the same ids, and the caller compares the token count in the bytes' own header). A
write hands the bytes through Lua, which costs Redis a pass over them, because only a script can keep
them out of the append-only file (`redis.set_repl`: to replicas, not to the AOF): a snapshot is a cache
the ids can always rebuild, and with `appendfsync always` fsyncing megabytes per write would stall every
other client of that Redis. A Redis restart therefore loses the snapshots written since its last AOF
rewrite (each conversation rebuilds once); a failover to a replica keeps them.
Its expiry is the conversation's: set from the metadata's at a write, slid with it by each turn (the
turn lock's script) and at a resume, and SessionStore.delete deletes it with the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from app.store.sessions import SessionStore

# KEYS: meta, ids, snap. ARGV: owner, turn token, tokens, identity, data.
# -> 1 written, -1 session gone, -2 the ids changed since that turn (a later turn or a rewind).
_WRITE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
local rewinds = redis.call('HGET', KEYS[1], 'rewinds') or '0'
if redis.call('HGET', KEYS[1], 'ids_turn') ~= ARGV[2] .. '/' .. rewinds then return -2 end
if redis.call('STRLEN', KEYS[2]) < 4 * tonumber(ARGV[3]) then return -2 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return -1 end
redis.set_repl(redis.REPL_REPLICA)
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'tokens', ARGV[3], 'rewinds', rewinds, 'identity', ARGV[4], 'data', ARGV[5])
redis.call('PEXPIRE', KEYS[3], ttl)
return 1
"""

# KEYS: meta, snap. ARGV: owner, identity, stored tokens (read under the turn lock), tokens already held.
# -> {0} none, or none covering more than the caller holds; {1, tokens}; or {-1} another
# checkpoint's, {-2} covers more ids than are stored, {-3} written before a rewind (the last two are
# deleted: no later turn can use them).
_READ = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {0} end
local snap = redis.call('HMGET', KEYS[2], 'tokens', 'rewinds', 'identity')
if not snap[1] then return {0} end
local code = 0
if tonumber(snap[1]) > tonumber(ARGV[3]) then code = -2
elseif snap[2] ~= (redis.call('HGET', KEYS[1], 'rewinds') or '0') then code = -3 end
if code ~= 0 then
  redis.call('DEL', KEYS[2])
  return {code}
end
if tonumber(snap[1]) <= tonumber(ARGV[4]) then return {0} end
if snap[3] ~= ARGV[2] then return {-1} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {1, tonumber(snap[1])}
"""

# Why a stored snapshot was not handed out (model/snapshot.py's reasons are the parsing ones).
Refusal = Literal["foreign", "too_long", "stale"]
_REFUSALS: dict[int, Refusal] = {-1: "foreign", -2: "too_long", -3: "stale"}


@dataclass(frozen=True)
class StoredSnapshot:
    tokens: int  # the snapshot covers ids [0, tokens)
    data: bytes  # model/snapshot.py's format; parsed (and checked again) by the caller


class SnapshotStore:
    """Reads and writes the `snap` key of SessionStore's conversations; Redis failures surface as
    StoreUnavailable, like every store operation."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._write = store.redis.register_script(_WRITE)
        self._read = store.redis.register_script(_READ)

    def key(self, session_id: str) -> str:
        return self._store.key(session_id, "snap")

    async def save(
        self, session_id: str, owner: str, *, turn_token: str, tokens: int, identity: str, data: bytes
    ) -> bool:
        """Store the snapshot of the state the turn holding `turn_token` computed; False (nothing
        written) when the conversation is gone or its ids changed since that turn."""
        store = self._store
        async with store.op("snapshot_write"):
            result = await self._write(
                keys=[store.key(session_id, "meta"), store.key(session_id, "ids"), self.key(session_id)],
                args=[owner, turn_token, tokens, identity, data],
            )
        return int(result) == 1

    async def load(
        self, session_id: str, owner: str, *, identity: str, stored_tokens: int, held_tokens: int = 0
    ) -> StoredSnapshot | Refusal | None:
        """The conversation's snapshot when it is this checkpoint's, covers a prefix of the
        `stored_tokens` ids and more than the `held_tokens` the caller's state has seen; the reason when
        one exists but can never be used here; None when there is none or it would not help."""
        store = self._store
        async with store.op("snapshot_read"):
            result = await self._read(
                keys=[store.key(session_id, "meta"), self.key(session_id)],
                args=[owner, identity, stored_tokens, held_tokens],
            )
        code = int(result[0])
        if code != 1:
            return _REFUSALS.get(code)
        # The bytes by a plain HGET: handed through Lua, Redis would hash all of them on the way.
        async with store.op("snapshot_read_data"):
            data = await store.redis.hget(self.key(session_id), "data")
        return None if data is None else StoredSnapshot(int(result[1]), cast(bytes, data))  # a bytes client

    async def delete(self, session_id: str) -> None:
        """Drop a snapshot that failed to parse: it can never be used."""
        async with self._store.op("snapshot_delete"):
            await self._store.redis.delete(self.key(session_id))
