"""SessionIndex: each owner's conversations, newest first, for `GET /v1/sessions` and the page's list.

    {prefix}owner:{<owner>}:sessions   sorted set: session id -> last update (Unix ms)

The index is a hint, the conversation's own keys are the truth. It lives on its owner's slot, not the
conversations' (one owner's conversations are spread over the Cluster), so it cannot change in the same
script as a conversation; instead it is kept correct by the reader:

- Added to before the conversation is created, removed from after it is deleted: a crash in between
  leaves an entry for a conversation that does not exist, never a conversation the list misses.
- A listing reads each listed conversation's header (one script on the conversation's own slot, which
  does not slide its TTL) and drops entries whose conversation has expired or been deleted.
- The index's own TTL is the conversations' TTL, renewed whenever one of the owner's conversations is
  used, so it expires only after every conversation it lists has.

Order is by last update; a conversation updated while a client pages moves to the front, so that client
sees it on its next first page, not twice in one walk. Cursors are opaque to clients: `<ms>:<session id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import cast

from app.errors import InvalidRequest, SessionNotFound, StoreUnavailable
from app.store.history import ConversationInfo, HistoryStore
from app.store.redis_client import RedisClient
from app.store.sessions import SessionStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionList:
    sessions: tuple[ConversationInfo, ...]
    next_cursor: str | None  # None: this was the last page


class SessionIndex:
    def __init__(self, redis: RedisClient, store: SessionStore, history: HistoryStore, prefix: str) -> None:
        self._redis = redis
        self._store = store
        self._history = history
        self._prefix = prefix

    def key(self, owner: str) -> str:
        return f"{self._prefix}owner:{{{owner}}}:sessions"

    async def add(self, owner: str, session_id: str) -> None:
        async with self._store.op("index_add"):
            # One round trip: both commands are on the owner's key, so one slot on a Cluster too.
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(self.key(owner), {session_id: _now_ms()})
            pipe.pexpire(self.key(owner), self._store.ttl_ms)
            await pipe.execute()

    async def touched(self, owner: str, session_id: str | None = None) -> None:
        """One of the owner's conversations was used (moved to the front when `session_id` is given and
        listed). Best effort: a failure here must not fail the turn that already succeeded."""
        try:
            async with self._store.op("index_touch"):
                pipe = self._redis.pipeline(transaction=False)
                if session_id is not None:
                    pipe.zadd(self.key(owner), {session_id: _now_ms()}, xx=True)
                pipe.pexpire(self.key(owner), self._store.ttl_ms)
                await pipe.execute()
        except StoreUnavailable:
            logger.warning("could not update the conversation list of %s", owner)

    async def remove(self, owner: str, session_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # a listing drops it anyway
            async with self._store.op("index_remove"):
                await self._redis.zrem(self.key(owner), session_id)

    async def page(self, owner: str, *, cursor: str | None = None, limit: int = 20) -> SessionList:
        """Up to `limit` live conversations after `cursor`, newest first; dead entries are dropped."""
        top, after = _parse_cursor(cursor)
        found: list[tuple[ConversationInfo, float]] = []
        dead: list[str] = []
        offset, exhausted = 0, False
        while len(found) <= limit and not exhausted:
            batch_size = limit + 1 - len(found) + 4
            async with self._store.op("index_page"):
                raw = await self._redis.zrevrangebyscore(
                    self.key(owner), top, "-inf", start=offset, num=batch_size, withscores=True
                )
            batch = cast(list[tuple[bytes, float]], raw)  # a bytes client, with scores
            offset += len(batch)
            exhausted = len(batch) < batch_size
            members = [
                (m.decode(), score)
                for m, score in batch
                if after is None or score < float(top) or m.decode() < after
            ]
            infos = await asyncio.gather(
                *(self._history.info(sid, owner, slide=False) for sid, _ in members), return_exceptions=True
            )
            for (sid, score), info in zip(members, infos, strict=True):
                if isinstance(info, SessionNotFound):
                    dead.append(sid)
                elif isinstance(info, BaseException):
                    raise info
                else:
                    found.append((info, score))
        if dead:
            async with self._store.op("index_prune"):
                await self._redis.zrem(self.key(owner), *dead)
        await self.touched(owner)
        page = found[:limit]
        more = len(found) > limit
        next_cursor = f"{int(page[-1][1])}:{page[-1][0].session_id}" if more and page else None
        return SessionList(tuple(info for info, _ in page), next_cursor)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse_cursor(cursor: str | None) -> tuple[float | str, str | None]:
    if cursor is None:
        return "+inf", None
    score, _, session_id = cursor.partition(":")
    if not score.isdigit() or not session_id:
        raise InvalidRequest(f"cursor {cursor[:80]!r} is not one this server gave out: send next_cursor back")
    return float(score), session_id
