"""OpenAIChat: an OpenAI Chat Completions request -> a running completion, stateless or on a session.

Two modes, one interface (`Completion`: pieces, finish, cancel), so the route streams and answers the
same way for both:

- Stateless (no X-Session-Id), like any OpenAI server: the whole `messages` list is encoded with the chat
  template and prefilled into a fresh decode state; nothing is stored in Redis and no state is cached
  (there is no conversation to come back to). The whole history travels in every request; its length
  in tokens is bounded by MAX_PROMPT_TOKENS (400 `context_length_exceeded` beyond, before any model work).
- On a session (X-Session-Id, a session the caller's key owns): the server already holds the
  conversation, so only the last message (which must be the user's) is new. It runs as an ordinary
  ChatService turn: stored like a REST or websocket turn, and the session's cached decode state is
  reused. Earlier messages in the request are ignored: the stored conversation is the truth.

CompletionRun runs a completion on its own task. A client that disconnects (or a response that is torn
down mid-stream) only cancels it; the task itself then stores the partial turn and releases the session
lock, which an interrupted request task could not be trusted to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import anyio
from pydantic import ValidationError

from app.chat import ChatService, Turn
from app.engine.requests import GenerationHandle, GenerationRequest
from app.errors import EngineFailed
from app.openai.errors import ModelNotFound, OpenAIInvalidRequest, PromptTooLong
from app.openai.protocol import ChatCompletionRequest, ChatMessage
from app.schemas import SamplingFields
from model import FinishReason, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletionResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int  # tokens fed to the model for this request (on a session: only the new turn)
    completion_tokens: int


class Completion(Protocol):
    """A reply being generated: its text pieces as they come, then the finished result."""

    def cancel(self) -> None: ...

    def pieces(self) -> AsyncIterator[str]: ...

    async def finish(self) -> CompletionResult: ...


class TurnCompletion:
    """A session turn (app/chat.py's Turn) seen as a Completion."""

    def __init__(self, turn: Turn) -> None:
        self._turn = turn

    def cancel(self) -> None:
        self._turn.cancel()

    def pieces(self) -> AsyncIterator[str]:
        return self._turn.pieces()

    async def finish(self) -> CompletionResult:
        outcome = await self._turn.finish()
        reason: FinishReason = outcome.message.finish_reason or "stop"
        return CompletionResult(
            outcome.message.content, reason, outcome.prompt_tokens, outcome.completion_tokens
        )


class _StatelessCompletion:
    """A request on the engine with a fresh state and nothing stored."""

    def __init__(self, handle: GenerationHandle, prompt_tokens: int) -> None:
        self._handle = handle
        self._prompt_tokens = prompt_tokens

    def cancel(self) -> None:
        self._handle.cancel()

    def pieces(self) -> AsyncIterator[str]:
        return self._handle.pieces()

    async def finish(self) -> CompletionResult:
        result = await self._handle.result()
        if result.error is not None:
            raise EngineFailed(f"the model failed while generating: {result.error}")
        return CompletionResult(result.text, result.finish_reason, self._prompt_tokens, len(result.token_ids))


def message_text(message: ChatMessage, index: int) -> str:
    """A message's text: its string content, or its text parts joined by newlines."""
    content = message.content
    if content is None:
        raise OpenAIInvalidRequest(
            f"messages[{index}] has no content: send its text (tool calls are not supported)",
            param=f"messages[{index}].content",
        )
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIInvalidRequest(
                f"messages[{index}].content[{j}] is a {part.get('type')!r} part: this server reads only "
                "text parts, {'type': 'text', 'text': ...}",
                param=f"messages[{index}].content[{j}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    """Settings OpenAI accepts that this server cannot honour: a 400 beats a silently different answer."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise OpenAIInvalidRequest(
                f"{name} is not supported: leave it out, or use repetition_penalty (> 1 discourages "
                "repeats; send it in the body, extra_body with the OpenAI SDK)",
                param=name,
            )
    if request.logprobs or request.top_logprobs:
        param = "logprobs" if request.logprobs else "top_logprobs"
        raise OpenAIInvalidRequest("logprobs are not supported by this server: leave them out", param=param)
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise OpenAIInvalidRequest(
                f"{name} are not supported: this model does not call functions; leave {name} out",
                param=name,
            )
    kind = (request.response_format or {}).get("type", "text")
    if kind != "text":
        raise OpenAIInvalidRequest(
            f"response_format {kind!r} is not supported: only plain text replies", param="response_format"
        )


class OpenAIChat:
    """Validates an OpenAI request against this server and opens its completion; one per request."""

    def __init__(self, chat: ChatService, model_id: str) -> None:
        self.chat = chat
        self.model_id = model_id
        self.retry_after = chat.settings.retry_after_seconds

    def sampling_params(self, request: ChatCompletionRequest) -> SamplingParams:
        limit = self.chat.settings.max_new_tokens
        asked = request.reply_limit
        if asked is not None and asked[1] > limit:
            raise OpenAIInvalidRequest(
                f"{asked[0]} {asked[1]} is above this server's MAX_NEW_TOKENS={limit}: ask for fewer",
                param=asked[0],
            )
        try:
            fields = SamplingFields(
                max_tokens=asked[1] if asked is not None else None,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                repetition_penalty=request.repetition_penalty,
                seed=request.seed,
                stop=request.stop,
                logit_bias=request.logit_bias,
            )
        except ValidationError as exc:  # the request's own validation already covers these bounds
            raise OpenAIInvalidRequest(str(exc)) from exc
        return self.chat.sampling_params(fields)

    def completion(
        self, request: ChatCompletionRequest, owner: str, session_id: str | None, *, tenant: str
    ) -> Callable[[], AbstractAsyncContextManager[Completion]]:
        """Validate everything now (errors are 4xx before any work), and return how to open it."""
        if request.model != self.model_id:
            raise ModelNotFound(request.model, self.model_id)
        _refuse_unsupported(request)
        params = self.sampling_params(request)
        if session_id is not None:
            last = len(request.messages) - 1
            if request.messages[last].role != "user":
                raise OpenAIInvalidRequest(
                    "with X-Session-Id the server keeps the conversation: messages must end with the new "
                    f"user message, but the last one is {request.messages[last].role!r}",
                    param="messages",
                )
            content = self.chat.check_content(message_text(request.messages[last], last))
            return lambda: self._on_session(owner, session_id, content, params, tenant)
        conversation = [
            {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
            for i, m in enumerate(request.messages)
        ]
        prompt_ids = self.chat.tokenizer.encode_chat(conversation, add_generation_prompt=True)
        limit = self.chat.settings.max_prompt_tokens
        if len(prompt_ids) > limit:
            raise PromptTooLong(len(prompt_ids), limit)
        return lambda: self._stateless(prompt_ids, params, tenant)

    @asynccontextmanager
    async def _on_session(
        self, owner: str, session_id: str, content: str, params: SamplingParams, tenant: str
    ) -> AsyncIterator[Completion]:
        async with self.chat.turn(owner, session_id, content, params, tenant=tenant) as turn:
            yield TurnCompletion(turn)

    @asynccontextmanager
    async def _stateless(
        self, prompt_ids: list[int], params: SamplingParams, tenant: str
    ) -> AsyncIterator[Completion]:
        request = GenerationRequest(
            state=None,
            feed_ids=prompt_ids,
            params=params,
            decoder=self.chat.tokenizer.stream_decoder(),
            prompt_tokens=len(prompt_ids),
            tenant=tenant,
        )
        handle = self.chat.engine.submit(request)
        try:
            yield _StatelessCompletion(handle, len(prompt_ids))
        finally:
            handle.cancel()  # a no-op once finished; stops the engine if the caller left early


class CompletionRun:
    """A completion on its own task: `start()` surfaces setup errors (busy, overloaded, not found) before
    any response is sent; `pieces()`/`result()` read what it produces; `aclose()` cancels it and waits,
    shielded, until it has stored its turn and released its lock."""

    def __init__(self, opener: Callable[[], AbstractAsyncContextManager[Completion]]) -> None:
        self._opener = opener
        self._events: asyncio.Queue[str | CompletionResult | BaseException] = asyncio.Queue()
        self._completion: Completion | None = None
        self._cancelled = False
        self._result: CompletionResult | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._produce(ready), name="openai-completion")
        await asyncio.shield(ready)

    async def _produce(self, ready: asyncio.Future[None]) -> None:
        try:
            async with self._opener() as completion:
                self._completion = completion
                if self._cancelled:  # the client left while the turn was being set up
                    completion.cancel()
                ready.set_result(None)
                async for piece in completion.pieces():
                    self._events.put_nowait(piece)
                self._events.put_nowait(await completion.finish())
        except BaseException as exc:
            if ready.done():
                self._events.put_nowait(exc)
            elif isinstance(exc, asyncio.CancelledError):
                ready.cancel()
            else:
                ready.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def cancel(self) -> None:
        """Stop generating (within one decode step); what was generated is still stored on a session."""
        self._cancelled = True
        if self._completion is not None:
            self._completion.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as generated; errors raised after start() surface here."""
        while self._result is None:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, CompletionResult):
                self._result = event
                return
            yield event

    async def result(self) -> CompletionResult:
        async for _ in self.pieces():
            pass
        if self._result is None:
            raise RuntimeError("the completion ended without a result")
        return self._result

    async def aclose(self) -> None:
        self.cancel()
        if self._task is not None and not self._task.done():
            # Shielded: a response torn down by a disconnect must still let the turn be stored.
            with anyio.CancelScope(shield=True):
                await asyncio.wait([self._task])
