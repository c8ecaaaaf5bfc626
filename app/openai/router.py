"""OpenAI-compatible surface: `POST /v1/chat/completions` (JSON or SSE) and `GET /v1/models`.

Existing OpenAI clients and SDKs work by pointing their base URL at `<server>/v1`; auth is the same
Bearer API key as the rest of the API. Errors use OpenAI's shape (app/openai/errors.py). The streamed bytes
are what OpenAI sends: one `data: {json}\\n\\n` event per `chat.completion.chunk`, all with the same
`id` and `created`; a first delta carrying the role, content deltas, a last chunk with `finish_reason` and
an empty delta, a usage chunk with `choices: []` when `stream_options.include_usage` asks for it, then
`data: [DONE]`. A client that disconnects cancels generation within one decode step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.deps import OwnerDep, ServicesDep, valid_session_id
from app.errors import EngineUnavailable, ServiceError
from app.openai.errors import ModelNotFound, OpenAIRoute, openai_error_response
from app.openai.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    ModelCard,
    ModelList,
)
from app.openai.serving import CompletionResult, CompletionRun, OpenAIChat
from app.ratelimit import caller_identity
from app.routes.disconnect import watch_disconnect

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def get_openai(services: ServicesDep) -> OpenAIChat:
    return OpenAIChat(services.chat, model_id=services.checkpoint.name)


OpenAIDep = Annotated[OpenAIChat, Depends(get_openai)]


def _model_card(services: ServicesDep) -> ModelCard:
    checkpoint = services.checkpoint
    return ModelCard(id=checkpoint.name, created=int(checkpoint.stat().st_mtime))


@router.get("/models")
async def list_models(_: OwnerDep, services: ServicesDep) -> ModelList:
    return ModelList(data=[_model_card(services)])


@router.get("/models/{model_id}")
async def get_model(model_id: str, _: OwnerDep, services: ServicesDep) -> ModelCard:
    card = _model_card(services)
    if model_id != card.id:
        raise ModelNotFound(model_id, card.id)
    return card


def _usage(result: CompletionResult) -> dict[str, int]:
    return CompletionUsage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    ).model_dump()


def _event(payload: dict[str, Any] | str) -> bytes:
    """One SSE event as OpenAI writes it: compact JSON, UTF-8 as is."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


class _Chunks:
    """`chat.completion.chunk` events of one completion: same id, created and model in each."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {**self._head, "choices": choices}
        if self.include_usage:  # OpenAI then sends "usage" in every chunk, null until the last
            chunk["usage"] = usage
        return _event(chunk)

    def delta(self, delta: dict[str, str]) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def finish(self, reason: str) -> bytes:
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, result: CompletionResult) -> bytes:
        return self._chunk([], _usage(result))


async def _stream(
    run: CompletionRun, watcher: asyncio.Task[None], chunks: _Chunks, retry_after: int
) -> AsyncIterator[bytes]:
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        async for piece in run.pieces():
            yield chunks.delta({"content": piece})
        result = await run.result()
        if result.finish_reason == "cancelled":  # the server is shutting down; the client is still here
            raise EngineUnavailable(retry_after)
        yield chunks.finish(result.finish_reason)
        if chunks.include_usage:
            yield chunks.usage(result)
        yield _event("[DONE]")
    except ServiceError as exc:
        # Headers are sent: the error travels as an event, which the OpenAI SDKs raise as an APIError.
        yield _event(json.loads(bytes(openai_error_response(exc).body)))
    finally:
        watcher.cancel()
        await run.aclose()


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "chat.completion or SSE chunks"}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    owner: OwnerDep,
    openai: OpenAIDep,
    x_session_id: Annotated[str | None, Header()] = None,
) -> Response:
    session_id = valid_session_id(x_session_id) if x_session_id is not None else None
    tenant = caller_identity(owner, request.client.host if request.client else None)
    run = CompletionRun(openai.completion(body, owner, session_id, tenant=tenant))
    watcher = asyncio.create_task(watch_disconnect(request, run.cancel))
    try:
        await run.start()
    except BaseException:
        watcher.cancel()
        await run.aclose()
        raise
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    headers = {"X-Session-Id": session_id} if session_id else {}
    if body.stream:
        chunks = _Chunks(completion_id, created, openai.model_id, body.include_usage)
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return StreamingResponse(
            _stream(run, watcher, chunks, openai.retry_after), media_type="text/event-stream", headers=headers
        )
    try:
        result = await run.result()
    finally:
        watcher.cancel()
        await run.aclose()
    if result.finish_reason == "cancelled":  # the server is shutting down, or the client already left
        raise EngineUnavailable(openai.retry_after)
    completion = ChatCompletion(
        id=completion_id,
        created=created,
        model=openai.model_id,
        choices=[Choice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
        usage=CompletionUsage(**_usage(result)),
    )
    return JSONResponse(completion.model_dump(), headers=headers)
