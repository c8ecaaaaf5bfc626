"""Responses API requests -> turns on sessions, and the Response objects they become.

Where a response runs:

- `conversation=conv_...`: a turn on that conversation (a session the key owns), exactly like a REST or
  websocket turn: the session's cached decode state is reused, so a turn costs the same at any length.
- `previous_response_id=resp_...`: the chain continues on the session that holds that response. When it is
  the last reply of a chain (the usual case), the turn runs there and reuses the cached state; when the
  client branches from an earlier response, or from a response inside a conversation, the history up to
  that response is copied to a new hidden session first (its state is rebuilt once from the token ids).
- neither: a new hidden session (kind "responses", not in the conversation list) holds the chain.
- `store=false`: nothing is written; the reply is generated from a fresh state fed the history (the
  previous response's, if any) and the input. Not allowed with `conversation`, whose turns are stored.

`instructions` become a system message before the input. OpenAI keeps instructions out of the next
response's context; a decode state cannot forget text it has seen, so here they are part of the stored
history (and visible as an item). Response objects are stored with their turn, in the session's records
(one script), so they live and expire with the conversation.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.chat import ChatService, InputMessage, TurnOutcome, stored_size
from app.engine import GenerationHandle, GenerationRequest
from app.errors import EngineFailed, SessionNotFound
from app.openai.conversations.serving import checked_messages, conversation_errors
from app.openai.errors import ModelNotFound, OpenAIInvalidRequest, PromptTooLong
from app.openai.items import (
    NotFound,
    check_metadata,
    item_id,
    parse_response_id,
    response_id,
    session_of,
)
from app.openai.responses.protocol import ResponseCreateRequest, conversation_param
from app.openai.serving import Completion, CompletionResult, TurnCompletion
from app.schemas import SamplingFields
from app.store.sessions import ID_BYTES, StoredResponse
from model import SamplingParams

_STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}


@dataclass(frozen=True)
class Generated:
    text: str
    finish_reason: str
    input_tokens: int  # the whole context the reply was generated after
    cached_tokens: int  # of which the cached decode state had already seen (not fed again)
    output_tokens: int


def refuse_unsupported(request: ResponseCreateRequest) -> None:
    """What OpenAI accepts and a text-only model on this server cannot do: a 400 naming the field."""
    refused = {
        "tools": bool(request.tools),
        "tool_choice": request.tool_choice not in (None, "none", "auto"),
        "reasoning": request.reasoning is not None,
        "background": bool(request.background),
        "prompt": request.prompt is not None,
        "top_logprobs": bool(request.top_logprobs),
        "include": bool(request.include),
    }
    for name, is_set in refused.items():
        if is_set:
            raise OpenAIInvalidRequest(
                f"{name} is not supported by this server (a text-only chat model without tools, reasoning "
                f"or logprobs): leave {name} out",
                name,
            )
    kind = ((request.text or {}).get("format") or {}).get("type", "text")
    if kind != "text":
        raise OpenAIInvalidRequest(
            f"text.format {kind!r} is not supported: only plain text replies", "text.format"
        )
    if request.conversation is not None and request.previous_response_id is not None:
        raise OpenAIInvalidRequest(
            "send conversation or previous_response_id, not both", "previous_response_id"
        )
    if request.conversation is not None and not request.store:
        raise OpenAIInvalidRequest(
            "store=false cannot be used with a conversation: a conversation's turns are stored", "store"
        )


class ResponseJob:
    """One response: where it runs, its ids once known, and its Response object once finished."""

    def __init__(
        self,
        serving: ResponsesServing,
        request: ResponseCreateRequest,
        owner: str,
        params: SamplingParams,
        inputs: list[InputMessage],
        tenant: str,
    ) -> None:
        self._serving = serving
        self.request = request
        self.owner = owner
        self.tenant = tenant  # whose share of the engine it takes (app/engine/engine.py)
        self.params = params
        self.inputs = inputs
        self.created_at = int(time.time())
        self.metadata = check_metadata(request.metadata)
        self.conversation = conversation_param(request.conversation)
        self.response_id = "resp_" + secrets.token_hex(24)  # replaced by the stored id when stored
        self.item_id = "msg_" + secrets.token_hex(24)
        self.final: dict[str, Any] | None = None

    def body(self, status: str, generated: Generated | None = None) -> dict[str, Any]:
        """The Response object in OpenAI's shape, in progress (no `generated`) or finished."""
        request = self.request
        output: list[dict[str, Any]] = []
        usage = None
        incomplete = None
        if generated is not None:
            output.append(
                self.message(generated.text, "completed" if status == "completed" else "incomplete")
            )
            usage = {
                "input_tokens": generated.input_tokens,
                "input_tokens_details": {"cached_tokens": generated.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": generated.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": generated.input_tokens + generated.output_tokens,
            }
            if generated.finish_reason == "length":
                incomplete = {"reason": "max_output_tokens"}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if generated is not None else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": self._serving.model_id,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": request.previous_response_id,
            "conversation": {"id": self.conversation} if self.conversation else None,
            "reasoning": None,
            "store": request.store,
            "temperature": self.params.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "top_p": self.params.top_p,
            "truncation": request.truncation or "disabled",
            "usage": usage,
            "user": request.user,
            "metadata": self.metadata,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [part] if status != "in_progress" else [],
        }

    def finished(self, generated: Generated) -> dict[str, Any]:
        self.final = self.body(_STATUS.get(generated.finish_reason, "completed"), generated)
        return self.final

    def opener(self, target: Target) -> Callable[[], AbstractAsyncContextManager[Completion]]:
        return lambda: self._open(target)

    @asynccontextmanager
    async def _open(self, target: Target) -> AsyncIterator[Completion]:
        chat = self._serving.chat
        if target.session_id is None:
            prompt = self._prompt_ids()
            feed_ids = [*target.history_ids, *prompt]
            limit = chat.settings.max_prompt_tokens
            if len(feed_ids) > limit:  # all of it is fed to a fresh state: bounded like a chat completion
                raise PromptTooLong(len(feed_ids), limit, param="input")
            request = GenerationRequest(
                state=None,
                feed_ids=feed_ids,
                params=self.params,
                decoder=chat.tokenizer.stream_decoder(),
                prompt_tokens=len(prompt),
                tenant=self.tenant,
            )
            handle = chat.engine.submit(request)
            try:
                yield _Stateless(handle, self, len(request.feed_ids))
            finally:
                handle.cancel()
            return
        session_id = target.session_id

        def respond(outcome: TurnOutcome) -> StoredResponse:
            body = self.finished(_generated(outcome))
            return StoredResponse(self.response_id, json.dumps(body, ensure_ascii=False))

        async with chat.turn(
            self.owner, session_id, self.inputs, self.params, respond=respond, tenant=self.tenant
        ) as turn:
            self.item_id = item_id(turn.reply_seq)
            self.response_id = response_id(session_id, turn.reply_seq)
            yield TurnCompletion(turn)

    def _prompt_ids(self) -> list[int]:
        tokenizer = self._serving.chat.tokenizer
        return [
            *(i for role, text in self.inputs for i in tokenizer.encode_turn(role, text)),
            tokenizer.assistant_id,
        ]


@dataclass(frozen=True)
class Target:
    session_id: str | None  # None: stateless, nothing stored
    history_ids: tuple[int, ...] = ()  # stateless only: the context before the input


def _generated(outcome: TurnOutcome) -> Generated:
    reason = outcome.message.finish_reason or "stop"
    # The stored context closes the reply with end-of-turn; the reply's own tokens are not input.
    input_tokens = outcome.context_tokens - outcome.completion_tokens - 1
    return Generated(
        outcome.message.content, reason, input_tokens, outcome.cached_tokens, outcome.completion_tokens
    )


class _Stateless:
    def __init__(self, handle: GenerationHandle, job: ResponseJob, input_tokens: int) -> None:
        self._handle = handle
        self._job = job
        self._input_tokens = input_tokens

    def cancel(self) -> None:
        self._handle.cancel()

    def pieces(self) -> AsyncIterator[str]:
        return self._handle.pieces()

    async def finish(self) -> CompletionResult:
        result = await self._handle.result()
        if result.error is not None:
            raise EngineFailed(f"the model failed while generating: {result.error}")
        output = len(result.token_ids)
        self._job.finished(Generated(result.text, result.finish_reason, self._input_tokens, 0, output))
        return CompletionResult(result.text, result.finish_reason, self._input_tokens, output)


class ResponsesServing:
    def __init__(self, chat: ChatService, model_id: str) -> None:
        self.chat = chat
        self.model_id = model_id
        self.retry_after = chat.settings.retry_after_seconds

    def sampling_params(self, request: ResponseCreateRequest) -> SamplingParams:
        limit = self.chat.settings.max_new_tokens
        if request.max_output_tokens is not None and request.max_output_tokens > limit:
            raise OpenAIInvalidRequest(
                f"max_output_tokens {request.max_output_tokens} is above this server's "
                f"MAX_NEW_TOKENS={limit}: ask for fewer",
                "max_output_tokens",
            )
        try:
            fields = SamplingFields(
                max_tokens=request.max_output_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                repetition_penalty=request.repetition_penalty,
                seed=request.seed,
                logit_bias=request.logit_bias,
            )
        except ValidationError as exc:
            raise OpenAIInvalidRequest(str(exc), "logit_bias") from exc
        return self.chat.sampling_params(fields)

    def job(self, request: ResponseCreateRequest, owner: str, *, tenant: str) -> ResponseJob:
        """Validate everything that needs no Redis (errors are 400s before any work)."""
        if request.model != self.model_id:
            raise ModelNotFound(request.model, self.model_id)
        refuse_unsupported(request)
        inputs = checked_messages(self.chat, request.input, "input")
        if request.instructions:
            inputs.insert(0, ("system", request.instructions))
        return ResponseJob(self, request, owner, self.sampling_params(request), inputs, tenant)

    async def target(self, job: ResponseJob) -> Target:
        """Where the response runs (see the module doc); 404s for what the key cannot see."""
        request, owner, chat = job.request, job.owner, self.chat
        if job.conversation is not None:
            session_id = session_of(job.conversation)
            async with conversation_errors(job.conversation):
                await chat.history.info(session_id, owner)
            return Target(session_id)
        if request.previous_response_id is None:
            if not request.store:
                return Target(None)
            return Target((await chat.create_session(owner, listed=False)).session_id)
        session_id, seq = parse_response_id(request.previous_response_id, "previous_response_id")
        try:
            await chat.history.response(session_id, owner, request.previous_response_id)
            info = await chat.history.info(session_id, owner)
            last = await chat.history.page(session_id, owner, limit=1, order="desc")
        except SessionNotFound as exc:
            raise NotFound(
                f"Previous response with id {request.previous_response_id!r} not found.",
                "previous_response_id",
            ) from exc
        at_tip = bool(last.messages) and last.messages[-1].seq == seq
        if request.store and at_tip and info.kind == "responses":
            return Target(session_id)
        messages, tokens = await chat.history.prefix(session_id, owner, seq)
        ids = await chat.store.read_ids(session_id, 0, tokens)
        if not request.store:
            return Target(None, tuple(ids))
        return Target(await self._fork(owner, messages, ids))

    async def _fork(self, owner: str, messages: tuple[Any, ...], ids: list[int]) -> str:
        """A new hidden session holding a copy of an earlier point of a chain."""
        chat = self.chat
        session_id = (await chat.create_session(owner, listed=False)).session_id
        # The copy counts against the key's stored bytes like any turn (app/store/quota.py).
        size = ID_BYTES * len(ids) + sum(stored_size(m, j + 1) for j, m in enumerate(messages))
        await chat.quota.reserve(owner, session_id, size)
        try:
            async with chat.store.turn_lock(session_id, owner) as lock:
                await chat.store.append_turn(session_id, owner, lock, new_ids=ids, messages=list(messages))
        except BaseException:
            await chat.quota.settle(owner, session_id, -size)
            raise
        return session_id

    async def retrieve(self, owner: str, resp_id: str, *, delete: bool = False) -> dict[str, Any]:
        session_id, _ = parse_response_id(resp_id)
        try:
            body = await self.chat.history.response(session_id, owner, resp_id, delete=delete)
        except SessionNotFound as exc:
            raise NotFound(f"Response with id {resp_id[:80]!r} not found.") from exc
        return json.loads(body)
