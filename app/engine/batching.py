"""Decode batches: the rows that go through one `model.decode()` call together at each engine step.

Continuous batching means rows join and leave between steps as replies start and end. Re-stacking every
row's state at every step, or at every join and leave, would copy all of them (megabytes per row) for a
decode step that costs a fraction of that; so `SlotBatch` keeps the rows in one preallocated state and
touches a row only when it joins (one row copied in) or leaves (one row copied out, the last row moved
into the hole). The step itself decodes a view of the first `len(batch)` rows, in place. A leaving row
is copied into the buffer of a state that joined earlier (the joiner's batch-size-1 state is not used
again once copied in) rather than into a fresh clone: a fresh multi-megabyte block is a new mapping whose
pages all fault on first touch.

That needs fixed-size states, which lsh/local models have whatever a conversation's length. A model with
"full" layers has states that grow, and those stack only at equal lengths: it gets a `SoloBatch` per
request instead (unbatched, like a server without this feature).
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from torch import Tensor

from model import DecodeState, ReformerLM

M = TypeVar("M")


class DecodeBatch(Protocol[M]):
    """Rows decoded together; `members[i]` is whatever the engine tracks for row i."""

    members: list[M]

    def accepts(self, state: DecodeState) -> bool:
        """Whether a row with this state can join."""
        ...

    def add(self, member: M, state: DecodeState) -> None:
        """Append a row, copying the batch-size-1 `state` in (the caller's state is not used again)."""
        ...

    def decode(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (LongTensor (B,)); return the next logits (B, V)."""
        ...

    def remove(self, members: list[M]) -> list[DecodeState]:
        """Drop these rows; returns their states (batch size 1, owned by the caller) in the same order."""
        ...


class SlotBatch(Generic[M]):
    """Rows packed at the front of one preallocated state of fixed-size (lsh/local) layers."""

    def __init__(self, model: ReformerLM, max_rows: int) -> None:
        if model.config.has_full_layers:
            raise ValueError("'full' attention states grow with the history: use SoloBatch for that model")
        self._model = model
        self._max_rows = max_rows
        self._pool: DecodeState | None = None  # capacity rows; rows [0, len) are live
        self._spare: list[DecodeState] = []  # joiners' batch-size-1 states, reused for leaving rows
        self.members: list[M] = []

    def __len__(self) -> int:
        return len(self.members)

    @property
    def capacity(self) -> int:
        return 0 if self._pool is None else self._pool.batch_size

    def accepts(self, state: DecodeState) -> bool:
        return len(self.members) < self._max_rows

    def add(self, member: M, state: DecodeState) -> None:
        if state.batch_size != 1:
            raise ValueError(f"a row joins with a batch-size-1 state, got batch size {state.batch_size}")
        if not self.accepts(state):
            raise ValueError(f"the batch is full ({self._max_rows} rows): raise max_running")
        row = len(self.members)
        pool = self._pool
        if pool is None or row == pool.batch_size:
            pool = self._grow(min(self._max_rows, max(1, 2 * row)))
        pool.copy_rows_(slice(row, row + 1), state)
        self.members.append(member)
        if len(self._spare) < self._max_rows:
            self._spare.append(state)

    def decode(self, tokens: Tensor) -> Tensor:
        rows = len(self.members)
        if self._pool is None or tokens.shape != (rows,):
            raise ValueError(f"need one token per row: {rows} rows, tokens of shape {tuple(tokens.shape)}")
        # A one-token decode updates a view of the live rows in place (DecodeState.rows): no copy back.
        live = self._pool.rows(slice(0, rows))
        logits = self._model.decode(tokens.view(rows, 1), live)[:, -1, :]  # (B, 1) -> (B, V)
        return logits

    def remove(self, members: list[M]) -> list[DecodeState]:
        if self._pool is None:
            raise ValueError("the batch is empty")
        rows = [next(i for i, live in enumerate(self.members) if live is m) for m in members]
        states = [self._take_out(self._pool, r) for r in rows]
        # Fill each hole with the current last row, highest holes first so no live row is overwritten.
        for row in sorted(rows, reverse=True):
            last = len(self.members) - 1
            if row != last:
                self._pool.copy_rows_(slice(row, row + 1), self._pool.rows(slice(last, last + 1)))
                self.members[row] = self.members[last]
            self.members.pop()
        if not self.members:
            self._pool, self._spare = None, []  # an idle server holds no batch memory
        return states

    def _take_out(self, pool: DecodeState, row: int) -> DecodeState:
        """Row `row` of the pool as a batch-size-1 state of its own, in a spare buffer when there is one."""
        live = pool.rows(slice(row, row + 1))
        if not self._spare:
            return live.clone()
        out = self._spare.pop()
        out.copy_rows_(slice(0, 1), live)
        return out

    def _grow(self, capacity: int) -> DecodeState:
        """Reallocate for `capacity` rows, keeping the live ones (doubling keeps this rare)."""
        pool = self._model.init_state(capacity)
        if self._pool is not None and self.members:
            live = slice(0, len(self.members))
            pool.copy_rows_(live, self._pool.rows(live))
        self._pool = pool
        return pool


class SoloBatch(Generic[M]):
    """One row with its own state: for "full" layers, whose states do not stack at different lengths."""

    def __init__(self, model: ReformerLM) -> None:
        self._model = model
        self.members: list[M] = []
        self._state: DecodeState | None = None

    def __len__(self) -> int:
        return len(self.members)

    def accepts(self, state: DecodeState) -> bool:
        return not self.members

    def add(self, member: M, state: DecodeState) -> None:
        if self.members:
            raise ValueError("a SoloBatch holds one row: start another for the next request")
        self.members.append(member)
        self._state = state

    def decode(self, tokens: Tensor) -> Tensor:
        if self._state is None or tokens.shape != (1,):
            raise ValueError(f"need one token for the one row, got tokens of shape {tuple(tokens.shape)}")
        return self._model.decode(tokens.view(1, 1), self._state)[:, -1, :]  # (1, V)

    def remove(self, members: list[M]) -> list[DecodeState]:
        if self._state is None or len(members) != 1 or members[0] is not self.members[0]:
            raise ValueError("a SoloBatch removes its one row")
        state, self._state, self.members = self._state, None, []
        return [state]
