"""StateCache: recently used sessions' decode states, least recently used first out, under a byte budget.

A cached state lets a turn feed only its new tokens. A state is *taken* out for the length of a turn
(the session lock guarantees one turn per session) and *put* back only after the turn is stored, so the
cache never holds a state that is ahead of Redis; a state that is behind (another replica answered a turn
meanwhile) is still usable, because the turn feeds the stored ids from `state.length` onwards.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from app.metrics import Metrics
from model import DecodeState

CacheKey = tuple[str, str]  # (owner, session_id)


@dataclass(frozen=True)
class CachedState:
    state: DecodeState
    # Tokens the state has seen, as a Python int: reading state.length on the event loop would
    # synchronise with the GPU.
    tokens: int
    nbytes: int
    # The conversation's rewind count (app/store/sessions.py) when the state was built: once history is cut
    # back, a state built before the cut may have seen removed text, whatever its length.
    rewinds: int = 0
    # Tokens covered by the conversation's newest snapshot in Redis, as far as this replica knows (0:
    # none known): the snapshot policy writes again once the state is far enough past it.
    snapshot_tokens: int = 0
    # The conversation's stored ids when the state was put back: fewer than are stored at the next turn
    # means another replica answered turns meanwhile (and may have left a newer snapshot).
    stored_tokens: int = 0


class StateCache:
    """Thread-safe LRU of DecodeStates; sized by `state.nbytes()`, not by entry count."""

    def __init__(self, budget_bytes: int, metrics: Metrics) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 (0 disables the cache), got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._metrics = metrics
        self._entries: OrderedDict[CacheKey, CachedState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: CacheKey) -> CachedState | None:
        """Remove and return the session's entry (a miss returns None); counted as a cache query."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes
            self._publish()
        self._metrics.state_cache_queries.inc()
        if entry is not None:
            self._metrics.state_cache_hits.inc()
        return entry

    def put(
        self,
        key: CacheKey,
        state: DecodeState,
        tokens: int,
        rewinds: int = 0,
        *,
        snapshot_tokens: int = 0,
        stored_tokens: int = 0,
    ) -> None:
        """Insert as most recently used, evicting the least recently used until within budget.

        A state larger than the whole budget is not kept: it would evict everything and then itself.
        """
        entry = CachedState(state, tokens, state.nbytes(), rewinds, snapshot_tokens, stored_tokens)
        with self._lock:
            self._pop(key)
            if entry.nbytes <= self.budget_bytes:
                self._entries[key] = entry
                self._bytes += entry.nbytes
                while self._bytes > self.budget_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self._bytes -= evicted.nbytes
            self._publish()

    def discard(self, key: CacheKey) -> None:
        """Forget a session (deleted, or its history cut back): its memory goes back to the others."""
        with self._lock:
            self._pop(key)
            self._publish()

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def _pop(self, key: CacheKey) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._publish()

    def _publish(self) -> None:
        self._metrics.state_cache_bytes.set(self._bytes)
        self._metrics.state_cache_entries.set(len(self._entries))
