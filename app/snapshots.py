"""Snapshots: resume a conversation's decode state from Redis instead of re-reading all its tokens.

A decode state has a fixed size whatever the conversation's length, so it can be stored with the
conversation (app/store/snapshots.py) and the first turn after a restart, a deploy, an eviction from the
state cache or a move to another replica feeds only the ids after the snapshot, not the whole history.

- `resume`, on a state-cache miss (or a cached state behind turns another replica answered): load the
  conversation's snapshot if it is this checkpoint's, covers a prefix of the stored ids and more than the
  state in hand; parse it off the event loop (model/snapshot.py checks the format
  version, the identity, the length and the checksum). Anything refused is counted by reason in
  `snapshot_rejected` and the turn rebuilds from the ids as before; a snapshot that cannot parse is
  deleted.
- `due` and `save_later`, after a stored turn: write a copy of the state when the conversation is at
  least SNAPSHOT_MIN_TOKENS long and SNAPSHOT_EVERY_TOKENS past its last snapshot. The write runs in a
  background task after the turn has released its lock (serialised in a worker thread), so it never
  delays the reply or the next turn; the store's script drops it if the ids changed since the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from app.errors import StoreUnavailable
from app.metrics import Metrics
from app.store.snapshots import SnapshotStore
from model import DecodeState, ReformerLM, SnapshotError, state_from_bytes, state_to_bytes

logger = logging.getLogger(__name__)


class Snapshots:
    """The policy and the plumbing between the state cache, the model's snapshot format and Redis."""

    def __init__(
        self,
        store: SnapshotStore,
        model: ReformerLM,
        identity: str,
        metrics: Metrics,
        *,
        min_tokens: int,
        every_tokens: int,
        max_bytes: int,
        max_writes: int,
    ) -> None:
        if min_tokens < 0 or every_tokens < 1 or max_bytes < 0 or max_writes < 1:
            raise ValueError(
                "need min_tokens >= 0, every_tokens >= 1, max_bytes >= 0, max_writes >= 1; got "
                f"{min_tokens}, {every_tokens}, {max_bytes}, {max_writes}"
            )
        self._store = store
        self.identity = identity
        self._metrics = metrics
        self.min_tokens = min_tokens
        self.every_tokens = every_tokens
        self.max_bytes = max_bytes
        self._max_writes = max_writes
        # The model's own empty state: the layout (kinds, shapes, dtypes) a snapshot must have.
        self._like = model.init_state(1)
        self._device = self._like.length.device
        # Fixed for lsh/local models (a "full" model's state grows: its snapshots are checked one by one).
        self.bytes_per_conversation = len(state_to_bytes(self._like, identity))
        metrics.snapshot_bytes.set(self.bytes_per_conversation)
        self._writes: set[asyncio.Task[None]] = set()

    # ---- resume ---------------------------------------------------------------------------------------
    async def resume(
        self, session_id: str, owner: str, stored_tokens: int, held_tokens: int = 0
    ) -> tuple[DecodeState, int] | None:
        """(state, tokens it covers) from the conversation's snapshot, or None to go on from the state
        held (`held_tokens` of the ids: 0 after a cache miss, more when the cached state is behind
        turns another replica answered) or to rebuild from the ids."""
        try:
            found = await self._store.load(
                session_id,
                owner,
                identity=self.identity,
                stored_tokens=stored_tokens,
                held_tokens=held_tokens,
            )
        except StoreUnavailable:
            return None  # the turn's own reads will say whether Redis is really down
        if found is None:
            return None
        if isinstance(found, str):
            self._reject(session_id, found)
            return None
        try:
            state, tokens = await asyncio.to_thread(self._parse, found.data, found.tokens)
        except SnapshotError as exc:
            self._reject(session_id, exc.reason, str(exc))
            with contextlib.suppress(StoreUnavailable):  # else it stays refused until a write replaces it
                await self._store.delete(session_id)
            return None
        self._metrics.snapshot_resumes.inc()
        return state, tokens

    def _parse(self, data: bytes, tokens: int) -> tuple[DecodeState, int]:
        state = state_from_bytes(data, self.identity, like=self._like, device=self._device)
        if state.seen_tokens() != tokens:
            held = state.seen_tokens()
            raise SnapshotError("corrupt", f"snapshot holds {held} tokens, its key says {tokens}")
        return state, tokens

    def _reject(self, session_id: str, reason: str, detail: str = "") -> None:
        self._metrics.snapshot_rejected.labels(reason).inc()
        # After a deploy or a rewind a refusal is expected; a damaged one is worth a look.
        level = logging.INFO if reason in ("foreign", "too_long", "stale") else logging.WARNING
        logger.log(level, "snapshot of %s not used (%s) %s; rebuilding", session_id, reason, detail)

    # ---- save -----------------------------------------------------------------------------------------
    def due(self, tokens: int, last_snapshot: int) -> bool:
        """Whether a state that has seen `tokens` ids should be written, the last snapshot covering
        `last_snapshot` of them (0 when none is known)."""
        return tokens >= self.min_tokens and tokens - last_snapshot >= self.every_tokens

    def save_later(
        self, session_id: str, owner: str, turn_token: str, state: DecodeState, tokens: int
    ) -> None:
        """Write `state` (a copy nobody else touches) in the background; skipped when too many writes
        are already in flight, since a later turn writes a newer one anyway."""
        if len(self._writes) >= self._max_writes:
            self._metrics.snapshot_skipped.labels("busy").inc()
            return
        task = asyncio.create_task(self._save(session_id, owner, turn_token, state, tokens))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _save(
        self, session_id: str, owner: str, turn_token: str, state: DecodeState, tokens: int
    ) -> None:
        metrics = self._metrics
        if state.nbytes() > self.max_bytes:
            metrics.snapshot_skipped.labels("too_big").inc()
            return
        data = await asyncio.to_thread(state_to_bytes, state, self.identity)
        del state
        try:
            written = await self._store.save(
                session_id, owner, turn_token=turn_token, tokens=tokens, identity=self.identity, data=data
            )
        except StoreUnavailable:
            metrics.snapshot_skipped.labels("error").inc()
            return
        if written:
            metrics.snapshot_writes.inc()
            metrics.snapshot_write_bytes.inc(len(data))
        else:
            metrics.snapshot_skipped.labels("changed").inc()

    async def flush(self, timeout: float) -> None:
        """Wait (at shutdown) for the writes in flight, so a graceful stop leaves the latest snapshots."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)
