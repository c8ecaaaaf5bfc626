"""ChatService: one chat turn from validated input to a stored reply, shared by REST and the websocket.

A turn: take the session's Redis lock -> tokenise just the new input messages -> take its cached decode
state (or none) -> read only the stored token ids that state has not seen -> generate on the engine
thread -> write input messages, reply and token ids in one script -> put the state back -> release the
lock -> write a snapshot of the state in the background, when one is due (app/snapshots.py). On a cache
miss, or when the cached state is behind turns another replica answered, the state is resumed from the
conversation's snapshot when one covers more of the stored ids. Routes only validate, call this, and
shape the response.

A turn may first cut history back (regenerate the last reply, edit the last user message): the cut is
written in the same script as the new turn, and a cached state is used only if it has seen nothing past
the cut and was built under the same rewind count (app/store/sessions.py); otherwise the state is rebuilt
from the kept token ids, so it never remembers removed text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType

from app.config import Settings
from app.engine import (
    CacheKey,
    ChatEngine,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    StateCache,
)
from app.errors import EngineFailed, InvalidRequest, SessionNotFound, StoreUnavailable
from app.schemas import SamplingFields
from app.snapshots import Snapshots
from app.store.history import ConversationInfo, HistoryStore, RewindTarget
from app.store.index import SessionIndex
from app.store.quota import StorageQuota
from app.store.sessions import (
    ID_BYTES,
    Rewind,
    Role,
    SessionRecord,
    SessionStore,
    StoredMessage,
    StoredResponse,
    TurnConflict,
    TurnLock,
    new_session_id,
    utc_now,
)
from model import ChatTokenizer, DecodeState, SamplingParams

logger = logging.getLogger(__name__)


TITLE_CHARS = 80  # a conversation's title: the start of its first user message

# (role, content) of a message a turn adds before the reply.
InputMessage = tuple[Role, str]


@dataclass(frozen=True)
class TurnOutcome:
    message: StoredMessage  # the assistant's reply as stored (with its seq)
    prompt_tokens: int  # the new input messages plus the assistant prefix
    completion_tokens: int
    context_tokens: int  # stored token ids after this turn
    inputs: tuple[StoredMessage, ...] = ()  # the input messages as stored (with their seqs)
    cached_tokens: int = 0  # context the cached decode state had already seen (not fed again)


class ChatService:
    """Sessions and turns; owns no state of its own beyond its collaborators."""

    def __init__(
        self,
        store: SessionStore,
        engine: ChatEngine,
        state_cache: StateCache,
        tokenizer: ChatTokenizer,
        settings: Settings,
        history: HistoryStore,
        index: SessionIndex,
        quota: StorageQuota,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.state_cache = state_cache
        self.snapshots = snapshots  # None: SNAPSHOTS_ENABLED=false
        self.tokenizer = tokenizer
        self.settings = settings
        self.history = history
        self.index = index
        self.quota = quota
        # The most bytes one generated token can add to a stored reply: its longest piece, JSON-escaped
        # at worst (6 bytes per character, \uXXXX). For the storage quota's worst-case reservation.
        self._reply_bytes_per_token = 6 * max(
            len(tokenizer.decode([i]).encode()) for i in range(tokenizer.vocab_size)
        )
        # A reply ends at end-of-turn, or if the model starts another turn (a role token) instead.
        self._stop_ids = (tokenizer.end_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.system_id)
        # Ids with no text that end nothing (padding, unknown): never generated, even if biased up.
        self._suppress_ids = tuple(sorted(tokenizer.special_ids - set(self._stop_ids)))

    async def create_session(
        self, owner: str, *, metadata: dict[str, str] | None = None, listed: bool = True
    ) -> SessionRecord:
        """A new conversation; `listed` ones appear in the owner's list (the index entry comes first,
        see app/store/index.py), the hidden ones hold Responses API chains. Either is counted against
        the owner's MAX_SESSIONS_PER_KEY first (QuotaExceeded), and uncounted if it is not created."""
        session_id = new_session_id()
        await self.quota.add_session(owner, session_id)
        try:
            if listed:
                record = await self.store.create(owner, metadata=metadata, session_id=session_id)
                await self.index.add(owner, record.session_id)
                return record
            return await self.store.create(owner, kind="responses", metadata=metadata, session_id=session_id)
        except BaseException:
            await self.quota.release(owner, [session_id])
            raise

    async def get_session(self, owner: str, session_id: str, *, with_messages: bool = True) -> SessionRecord:
        record = await self.store.get(session_id, owner, with_messages=with_messages)
        await self.index.touched(owner)
        return record

    async def info(
        self, owner: str, session_id: str, *, metadata: dict[str, str] | None = None
    ) -> ConversationInfo:
        info = await self.history.info(session_id, owner, metadata=metadata)
        await self.index.touched(owner)
        return info

    async def delete_session(self, owner: str, session_id: str) -> None:
        await self.store.delete(session_id, owner)
        self.state_cache.discard((owner, session_id))
        await self.index.remove(owner, session_id)
        try:
            await self.quota.release(owner, [session_id])
        except StoreUnavailable:  # the ledger drops it later, when the key next reaches a limit
            logger.warning("could not release session %s from its key's quota", session_id)

    async def append_messages(
        self, owner: str, session_id: str, messages: Sequence[InputMessage]
    ) -> tuple[StoredMessage, ...]:
        """Add messages without generating (the Conversations API's items.create): their token ids are
        appended like a turn's, so the next turn's state (cached or rebuilt) has seen them."""
        stored = self.stored_inputs(messages)
        new_ids = [i for _, ids in stored for i in ids]
        async with self.store.turn_lock(session_id, owner) as lock:
            first_seq = lock.seq + 1
            size = ID_BYTES * len(new_ids) + sum(
                stored_size(m, first_seq + j) for j, (m, _) in enumerate(stored)
            )
            await self.quota.reserve(owner, session_id, size)
            try:
                await self.store.append_turn(
                    session_id,
                    owner,
                    lock,
                    new_ids=new_ids,
                    messages=[m for m, _ in stored],
                    title=title_of(messages),
                )
            except TurnConflict as exc:
                await self.quota.settle(owner, session_id, -size)
                raise _conflict_error(exc, session_id, self.settings.retry_after_seconds) from exc
            except BaseException:
                await self.quota.settle(owner, session_id, -size)
                raise
        await self.index.touched(owner, session_id)
        return tuple(
            StoredMessage(m.role, m.content, m.created_at, None, m.tokens, lock.seq + 1 + j)
            for j, (m, _) in enumerate(stored)
        )

    async def remove_message(self, owner: str, session_id: str, seq: int) -> None:
        """Delete one message and its token ids; the session's cached state is dropped (a state that
        saw the message must never be reused, here or on another replica: see app/store/sessions.py)."""
        async with self.store.turn_lock(session_id, owner) as lock:
            self.state_cache.discard((owner, session_id))
            await self.history.remove(session_id, owner, lock, seq)
        await self.index.touched(owner, session_id)

    def stored_inputs(self, messages: Sequence[InputMessage]) -> list[tuple[StoredMessage, list[int]]]:
        """Each input message as it will be stored, with its own token ids (its span)."""
        now = utc_now()
        out = []
        for role, content in messages:
            ids = self.tokenizer.encode_turn(role, content)
            out.append((StoredMessage(role, content, now, tokens=len(ids)), ids))
        return out

    def worst_case_bytes(self, inputs: Sequence[StoredMessage], prompt_tokens: int, max_tokens: int) -> int:
        """The most a turn can add to the store: its messages' JSON (the reply's text at the longest
        piece per token, JSON-escaped), every token id it could write, and a Responses API object that
        repeats them."""
        # A reply cut by a stop string re-encodes the cut token's kept text (Turn._store): at most one
        # token's text, so fewer extra ids than the reply has tokens.
        ids = ID_BYTES * (prompt_tokens + 2 * max_tokens + 2)
        text = sum(stored_size(m, 10**12) for m in inputs) + 256 + max_tokens * self._reply_bytes_per_token
        return ids + 2 * text + 1024

    def check_content(self, content: str) -> str:
        """The user message, refused (422) when blank or longer than MAX_MESSAGE_CHARS."""
        if not content.strip():
            raise InvalidRequest("content is empty: send a message with some text in it")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800" in the JSON
            raise InvalidRequest(f"content is not valid Unicode ({exc.reason}): send UTF-8 text") from exc
        limit = self.settings.max_message_chars
        if len(content) > limit:
            raise InvalidRequest(
                f"content has {len(content)} characters, more than MAX_MESSAGE_CHARS={limit}: shorten it"
            )
        return content

    def sampling_params(self, fields: SamplingFields) -> SamplingParams:
        """The request's sampling fields over the server defaults, capped by MAX_NEW_TOKENS (422 beyond)."""
        s = self.settings
        if fields.max_tokens is not None and fields.max_tokens > s.max_new_tokens:
            raise InvalidRequest(
                f"max_tokens {fields.max_tokens} is above this server's MAX_NEW_TOKENS={s.max_new_tokens}: "
                "ask for fewer"
            )
        vocab = self.tokenizer.vocab_size
        if fields.logit_bias and max(fields.logit_bias) >= vocab:
            raise InvalidRequest(f"logit_bias token ids must be below the vocabulary size {vocab}")
        try:
            return SamplingParams(
                temperature=s.default_temperature if fields.temperature is None else fields.temperature,
                top_k=s.default_top_k if fields.top_k is None else fields.top_k,
                top_p=s.default_top_p if fields.top_p is None else fields.top_p,
                repetition_penalty=(
                    s.default_repetition_penalty
                    if fields.repetition_penalty is None
                    else fields.repetition_penalty
                ),
                max_tokens=s.max_new_tokens if fields.max_tokens is None else fields.max_tokens,
                seed=fields.seed,
                stop_token_ids=self._stop_ids,
                suppress_ids=self._suppress_ids,
                stop_strings=tuple(fields.stop or ()),
                logit_bias=dict(fields.logit_bias or {}),
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc

    def turn(
        self,
        owner: str,
        session_id: str,
        content: str | Sequence[InputMessage],
        params: SamplingParams,
        *,
        rewind: RewindTarget | None = None,
        respond: Responder | None = None,
        tenant: str | None = None,
    ) -> Turn:
        """A turn to run as `async with service.turn(...) as turn:`; see Turn. `content` is the user
        message, or the messages to add before the reply (none: answer the history as it stands).
        `tenant` is whose share of the engine it takes (default: the owner; a client address on an open
        server)."""
        inputs: list[InputMessage] = [("user", content)] if isinstance(content, str) else list(content)
        return Turn(
            self,
            owner,
            session_id,
            inputs,
            params,
            rewind=rewind,
            respond=respond,
            tenant=owner if tenant is None else tenant,
        )


def title_of(messages: Sequence[InputMessage]) -> str:
    first = next((content for role, content in messages if role == "user"), "")
    return " ".join(first.split())[:TITLE_CHARS]


def stored_size(message: StoredMessage, seq: int) -> int:
    """Bytes a message takes in the store: its JSON with `"seq":<n>,` written in front."""
    return len(message.to_json().encode()) + len(f'"seq":{seq},')


def _conflict_error(exc: TurnConflict, session_id: str, retry_after: int) -> Exception:
    if exc.deleted:
        return SessionNotFound(session_id)
    return StoreUnavailable(str(exc), retry_after=retry_after)


# Builds the Responses API object stored with a turn, from the turn as it will be stored.
Responder = Callable[[TurnOutcome], StoredResponse]


class Turn:
    """Input messages and their reply, as an async context manager.

    Entering takes the lock and submits the generation (SessionNotFound, SessionBusy, Overloaded and
    StoreUnavailable surface here, before anything is generated). `pieces()` streams the reply text;
    `finish()` stores the turn and returns it. Leaving the block without `finish()` (the client went
    away, or an error) cancels the generation and still stores what was generated, as "cancelled".
    """

    def __init__(
        self,
        service: ChatService,
        owner: str,
        session_id: str,
        inputs: list[InputMessage],
        params: SamplingParams,
        *,
        rewind: RewindTarget | None = None,
        respond: Responder | None = None,
        tenant: str,
    ):
        self._service = service
        self._owner = owner
        self._tenant = tenant
        self.session_id = session_id
        self._inputs = inputs
        self._params = params
        self._rewind_target = rewind
        self._respond = respond
        self._key: CacheKey = (owner, session_id)
        self._stack = AsyncExitStack()
        self._lock: TurnLock | None = None
        self._rewind: Rewind | None = None
        self._stored_inputs: list[tuple[StoredMessage, list[int]]] = []
        self._cached_tokens = 0
        self._handle: GenerationHandle | None = None
        self._outcome: TurnOutcome | None = None
        self._finish_called = False
        self._snapshot_tokens = 0  # what the conversation's newest known snapshot covers
        self._pending_snapshot: tuple[DecodeState, int] | None = None  # written once the lock is released
        self.prompt_ids: list[int] = []
        self.created_at = ""
        self._reserved = 0  # bytes reserved against the key's storage quota
        self._stored_bytes = 0  # bytes this turn wrote to the store

    async def __aenter__(self) -> Turn:
        service = self._service
        try:
            self._lock = await self._stack.enter_async_context(
                service.store.turn_lock(self.session_id, self._owner)
            )
            self.created_at = utc_now()
            self._stored_inputs = service.stored_inputs(self._inputs)
            self.prompt_ids = [
                *(i for _, ids in self._stored_inputs for i in ids),
                service.tokenizer.assistant_id,
            ]
            await self._reserve_storage()
            stored = self._lock.context_tokens
            if self._rewind_target is not None:
                self._rewind = await service.history.plan_rewind(
                    self.session_id, self._lock, self._rewind_target
                )
                stored = self._rewind.keep_tokens
            cached = service.state_cache.take(self._key)
            if cached is not None and (cached.tokens > stored or cached.rewinds != self._lock.rewinds):
                # Ahead of the (kept) history, or built before a cut: it may have seen text that is gone.
                cached = None
            state, start = (cached.state, cached.tokens) if cached is not None else (None, 0)
            if cached is not None:
                self._snapshot_tokens = cached.snapshot_tokens
            if service.snapshots is not None and (cached is None or cached.stored_tokens < stored):
                # A miss, or a state behind turns another replica answered: a newer snapshot feeds less.
                resumed = await service.snapshots.resume(self.session_id, self._owner, stored, start)
                if resumed is not None:
                    state, start = resumed
                    self._snapshot_tokens = start
            self._cached_tokens = start
            history = await service.store.read_ids(self.session_id, start, stored)
            request = GenerationRequest(
                state=state,
                feed_ids=history + self.prompt_ids,
                params=self._params,
                decoder=service.tokenizer.stream_decoder(),
                prompt_tokens=len(self.prompt_ids),
                tenant=self._tenant,
            )
            try:
                self._handle = service.engine.submit(request)
            except BaseException:
                if state is not None:  # not consumed: keep it for the next turn
                    service.state_cache.put(
                        self._key,
                        state,
                        start,
                        self._lock.rewinds,
                        snapshot_tokens=self._snapshot_tokens,
                        stored_tokens=self._lock.context_tokens,
                    )
                raise
        except TurnConflict as exc:
            await self._stack.aclose()
            raise StoreUnavailable(str(exc), retry_after=service.settings.retry_after_seconds) from exc
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _reserve_storage(self) -> None:
        """Reserve the turn's worst case against the key's storage quota (QuotaExceeded before any work);
        what is not used is given back when the turn is stored, all of it when it is not."""
        quota = self._service.quota
        inputs = [m for m, _ in self._stored_inputs]
        size = self._service.worst_case_bytes(inputs, len(self.prompt_ids), self._params.max_tokens)
        await quota.reserve(self._owner, self.session_id, size)
        self._reserved = size

        async def settle() -> None:
            await quota.settle(self._owner, self.session_id, self._stored_bytes - self._reserved)

        self._stack.push_async_callback(settle)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._outcome is None and self._handle is not None:
                # The block ended early (client gone, an error, or a wait inside finish() cancelled):
                # the engine stops the row at its next step instead of generating for nobody.
                self._handle.cancel()
            if not self._finish_called and self._handle is not None:
                # Keep what was generated.
                try:
                    await self.finish()
                except Exception:  # the original error, if any, is the one to report
                    logger.warning("could not store the cancelled turn of %s", self.session_id, exc_info=True)
        finally:
            await self._stack.aclose()
            self._snapshot_after_unlock()

    def _snapshot_after_unlock(self) -> None:
        """Hand the state to the background writer now that the lock is released (the store's script
        refuses it if another turn or a rewind changed the ids meanwhile)."""
        pending, self._pending_snapshot = self._pending_snapshot, None
        snapshots = self._service.snapshots
        if pending is not None and snapshots is not None and self._lock is not None:
            state, tokens = pending
            snapshots.save_later(self.session_id, self._owner, self._lock.token, state, tokens)

    @property
    def reply_seq(self) -> int:
        """The number the reply will be stored under (known once the lock is held)."""
        if self._lock is None:
            raise RuntimeError("use the turn inside `async with`")
        return self._lock.seq + len(self._inputs) + 1

    def cancel(self) -> None:
        """Stop generating within one decode step; finish() then stores the partial reply."""
        if self._handle is not None:
            self._handle.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text as it is generated; the pieces concatenate to the stored reply."""
        if self._handle is None:
            raise RuntimeError("use the turn inside `async with`")
        async for piece in self._handle.pieces():
            yield piece

    async def finish(self) -> TurnOutcome:
        """Wait for the reply and store the turn atomically. Called once: a failed store is not retried,
        so a client that got an error never finds the turn stored behind its back."""
        if self._outcome is not None:
            return self._outcome
        if self._handle is None or self._lock is None:
            raise RuntimeError("use the turn inside `async with`")
        if self._finish_called:
            raise RuntimeError("this turn already failed to finish")
        self._finish_called = True
        result = await self._handle.result()
        if result.error is not None:
            raise EngineFailed(f"the model failed while generating: {result.error}; the turn was not stored")
        self._outcome = await self._store(result, self._lock)
        return self._outcome

    async def _store(self, result: GenerationResult, lock: TurnLock) -> TurnOutcome:
        service = self._service
        generated, state = result.token_ids, result.state
        if service.tokenizer.decode(generated) != result.text:
            # A stop string cut the reply inside the generated tokens: store the tokens of the text the
            # user received, so the model never remembers text it was not shown. The state has seen every
            # generated token but the last; it is kept only while that is still a prefix of what is stored.
            generated = service.tokenizer.ids_for_prefix(generated, result.text)
            seen = len(result.token_ids) - 1
            if generated[:seen] != result.token_ids[:seen]:
                state = None
        # The stored ids always close the turn with end-of-turn, whatever stopped it, so the next turn's
        # context is well formed; the state has seen a prefix of these ids, never more.
        reply_ids = [service.tokenizer.assistant_id, *generated, service.tokenizer.end_id]
        first_seq = lock.seq + 1
        inputs = tuple(
            StoredMessage(m.role, m.content, self.created_at, None, m.tokens, first_seq + j)
            for j, (m, _) in enumerate(self._stored_inputs)
        )
        reply = StoredMessage(
            "assistant", result.text, utc_now(), result.finish_reason, len(reply_ids), first_seq + len(inputs)
        )
        kept = lock.context_tokens if self._rewind is None else self._rewind.keep_tokens
        new_ids = [*self.prompt_ids[:-1], *reply_ids]
        outcome = TurnOutcome(
            reply,
            len(self.prompt_ids),
            len(result.token_ids),
            kept + len(new_ids),
            inputs,
            self._cached_tokens,
        )
        response = self._respond(outcome) if self._respond is not None else None
        try:
            await service.store.append_turn(
                self.session_id,
                self._owner,
                lock,
                new_ids=new_ids,
                messages=[*inputs, reply],
                rewind=self._rewind,
                title=title_of(self._inputs),
                response=response,
            )
        except TurnConflict as exc:
            raise _conflict_error(exc, self.session_id, service.settings.retry_after_seconds) from exc
        # What the store now holds more (a rewind's cut token ids count as freed; its cut messages do
        # not, and stay counted until the session goes: the quota over-counts, never under).
        self._stored_bytes = (
            ID_BYTES * (len(new_ids) - (lock.context_tokens - kept))
            + sum(stored_size(m, m.seq) for m in (*inputs, reply))
            + (len(response.body.encode()) if response is not None else 0)
        )
        if state is not None:
            rewinds = lock.rewinds + (self._rewind is not None)
            # A cut makes every older snapshot stale (it counts a rewind): none is known then.
            covered = 0 if self._rewind is not None else self._snapshot_tokens
            snapshots = service.snapshots
            if snapshots is not None and snapshots.due(result.state_tokens, covered):
                # A copy: the cached state may be advanced by the next turn while this one is written.
                self._pending_snapshot = (state.clone(), result.state_tokens)
                covered = result.state_tokens
            service.state_cache.put(
                self._key,
                state,
                result.state_tokens,
                rewinds,
                snapshot_tokens=covered,
                stored_tokens=outcome.context_tokens,
            )
        await service.index.touched(self._owner, self.session_id)
        return outcome
