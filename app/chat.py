"""ChatService: one chat turn from validated input to a stored reply, shared by REST and the websocket.

A turn: take the session's Redis lock -> tokenise just the new user message -> take its cached decode
state (or none) -> read only the stored token ids that state has not seen -> generate on the engine
thread -> write user message, reply and token ids in one script -> put the state back -> release the lock.
Routes only validate, call this, and shape the response.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
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
from app.store.sessions import SessionRecord, SessionStore, StoredMessage, TurnConflict, TurnLock, utc_now
from model import ChatTokenizer, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnOutcome:
    message: StoredMessage  # the assistant's reply as stored
    prompt_tokens: int  # the new user turn plus the assistant prefix
    completion_tokens: int
    context_tokens: int  # stored token ids after this turn


class ChatService:
    """Sessions and turns; owns no state of its own beyond its collaborators."""

    def __init__(
        self,
        store: SessionStore,
        engine: ChatEngine,
        state_cache: StateCache,
        tokenizer: ChatTokenizer,
        settings: Settings,
    ) -> None:
        self.store = store
        self.engine = engine
        self.state_cache = state_cache
        self.tokenizer = tokenizer
        self.settings = settings
        # A reply ends at end-of-turn, or if the model starts another turn (a role token) instead.
        self._stop_ids = (tokenizer.end_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.system_id)

    async def create_session(self, owner: str) -> SessionRecord:
        return await self.store.create(owner)

    async def get_session(self, owner: str, session_id: str, *, with_messages: bool = True) -> SessionRecord:
        return await self.store.get(session_id, owner, with_messages=with_messages)

    async def delete_session(self, owner: str, session_id: str) -> None:
        await self.store.delete(session_id, owner)
        self.state_cache.discard((owner, session_id))

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
                stop_strings=tuple(fields.stop or ()),
                logit_bias=dict(fields.logit_bias or {}),
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc

    def turn(self, owner: str, session_id: str, content: str, params: SamplingParams) -> Turn:
        """A turn to run as `async with service.turn(...) as turn:`; see Turn."""
        return Turn(self, owner, session_id, content, params)


class Turn:
    """One user message and its reply, as an async context manager.

    Entering takes the lock and submits the generation (SessionNotFound, SessionBusy, Overloaded and
    StoreUnavailable surface here, before anything is generated). `pieces()` streams the reply text;
    `finish()` stores the turn and returns it. Leaving the block without `finish()` (the client went
    away, or an error) cancels the generation and still stores what was generated, as "cancelled".
    """

    def __init__(
        self, service: ChatService, owner: str, session_id: str, content: str, params: SamplingParams
    ):
        self._service = service
        self._owner = owner
        self.session_id = session_id
        self._content = content
        self._params = params
        self._key: CacheKey = (owner, session_id)
        self._stack = AsyncExitStack()
        self._lock: TurnLock | None = None
        self._handle: GenerationHandle | None = None
        self._outcome: TurnOutcome | None = None
        self._finish_called = False
        self.prompt_ids: list[int] = []
        self.created_at = ""

    async def __aenter__(self) -> Turn:
        service = self._service
        try:
            self._lock = await self._stack.enter_async_context(
                service.store.turn_lock(self.session_id, self._owner)
            )
            self.created_at = utc_now()
            self.prompt_ids = [
                *service.tokenizer.encode_turn("user", self._content),
                service.tokenizer.assistant_id,
            ]
            cached = service.state_cache.take(self._key)
            stored = self._lock.context_tokens
            if cached is not None and cached.tokens > stored:
                logger.warning("cached state of %s is ahead of the store; rebuilding", self.session_id)
                cached = None
            start = cached.tokens if cached is not None else 0
            history = await service.store.read_ids(self.session_id, start, stored)
            request = GenerationRequest(
                state=cached.state if cached is not None else None,
                feed_ids=history + self.prompt_ids,
                params=self._params,
                decoder=service.tokenizer.stream_decoder(),
                prompt_tokens=len(self.prompt_ids),
            )
            try:
                self._handle = service.engine.submit(request)
            except BaseException:
                if cached is not None:  # not consumed: keep it for the next turn
                    service.state_cache.put(self._key, cached.state, cached.tokens)
                raise
        except TurnConflict as exc:
            await self._stack.aclose()
            raise StoreUnavailable(str(exc), retry_after=service.settings.retry_after_seconds) from exc
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self._finish_called and self._handle is not None:
                # The block ended early (client gone, or an error): keep what was generated.
                self._handle.cancel()
                try:
                    await self.finish()
                except Exception:  # the original error, if any, is the one to report
                    logger.warning("could not store the cancelled turn of %s", self.session_id, exc_info=True)
        finally:
            await self._stack.aclose()

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
        reply = StoredMessage("assistant", result.text, utc_now(), result.finish_reason)
        # The stored ids always close the turn with end-of-turn, whatever stopped it, so the next turn's
        # context is well formed; the state has seen a prefix of these ids, never more.
        new_ids = [*self.prompt_ids, *result.token_ids, service.tokenizer.end_id]
        try:
            total = await service.store.append_turn(
                self.session_id,
                self._owner,
                lock.token,
                expected_tokens=lock.context_tokens,
                new_ids=new_ids,
                messages=[StoredMessage("user", self._content, self.created_at), reply],
            )
        except TurnConflict as exc:
            if exc.deleted:
                raise SessionNotFound(self.session_id) from exc
            raise StoreUnavailable(str(exc), retry_after=service.settings.retry_after_seconds) from exc
        if result.state is not None:
            service.state_cache.put(self._key, result.state, result.state_tokens)
        return TurnOutcome(reply, len(self.prompt_ids), len(result.token_ids), total)
