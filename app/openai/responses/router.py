"""`/v1/responses`: OpenAI's Responses API (create, JSON or streamed; retrieve; delete) on sessions.

A streamed response is server-sent events as OpenAI writes them, `event: <type>` then `data: {json}`, each
with a `sequence_number` from 0, in this order: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (one per piece),
response.output_text.done, response.content_part.done, response.output_item.done, and last
response.completed (or response.incomplete when max_output_tokens cut the reply). There is no [DONE].
An error after the headers are sent is an `error` event. A client that disconnects cancels generation
within one decode step; the partial reply is still stored with its turn, as on every other surface.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.deps import ChatDep, OwnerDep, ServicesDep
from app.errors import EngineUnavailable, ServiceError
from app.openai.errors import OpenAIRoute, openai_error_response
from app.openai.responses.protocol import ResponseCreateRequest
from app.openai.responses.serving import ResponseJob, ResponsesServing
from app.openai.serving import CompletionRun
from app.ratelimit import caller_identity

router = APIRouter(prefix="/v1/responses", tags=["openai"], route_class=OpenAIRoute)


def get_serving(chat: ChatDep, services: ServicesDep) -> ResponsesServing:
    return ResponsesServing(chat, model_id=services.checkpoint.name)


ServingDep = Annotated[ResponsesServing, Depends(get_serving)]


class _Events:
    """Numbered SSE events of one response."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self._next}
        self._next += 1
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n".encode()


async def _watch_disconnect(request: Request, run: CompletionRun) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.cancel()


async def _stream(job: ResponseJob, run: CompletionRun, watcher: asyncio.Task[None]) -> AsyncIterator[bytes]:
    event = _Events()
    where = {"item_id": job.item_id, "output_index": 0, "content_index": 0}
    try:
        yield event("response.created", response=job.body("in_progress"))
        yield event("response.in_progress", response=job.body("in_progress"))
        yield event("response.output_item.added", output_index=0, item=job.message("", "in_progress"))
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", **where, part=empty)
        async for piece in run.pieces():
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
        result = await run.result()
        if result.finish_reason == "cancelled":  # the server is shutting down; the client is still here
            raise EngineUnavailable(1)
        final = job.final
        if final is None:
            raise RuntimeError("the response finished without its object")
        item = final["output"][0]
        yield event("response.output_text.done", **where, text=result.text, logprobs=[])
        yield event("response.content_part.done", **where, part=item["content"][0])
        yield event("response.output_item.done", output_index=0, item=item)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield event(kind, response=final)
    except ServiceError as exc:
        error = json.loads(bytes(openai_error_response(exc).body))["error"]
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
    finally:
        watcher.cancel()
        await run.aclose()


@router.post(
    "",
    responses={200: {"content": {"text/event-stream": {}}, "description": "a Response, or its SSE events"}},
)
async def create_response(
    body: ResponseCreateRequest, request: Request, owner: OwnerDep, serving: ServingDep
) -> Response:
    job = serving.job(
        body, owner, tenant=caller_identity(owner, request.client.host if request.client else None)
    )
    target = await serving.target(job)
    run = CompletionRun(job.opener(target))
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        await run.start()
    except BaseException:
        watcher.cancel()
        await run.aclose()
        raise
    if body.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(job, run, watcher), media_type="text/event-stream", headers=headers)
    try:
        result = await run.result()
    finally:
        watcher.cancel()
        await run.aclose()
    if result.finish_reason == "cancelled" or job.final is None:
        raise EngineUnavailable(serving.retry_after)
    return JSONResponse(job.final)


@router.get("/{response_id}")
async def retrieve_response(response_id: str, owner: OwnerDep, serving: ServingDep) -> dict[str, Any]:
    return await serving.retrieve(owner, response_id)


@router.delete("/{response_id}")
async def delete_response(response_id: str, owner: OwnerDep, serving: ServingDep) -> dict[str, Any]:
    await serving.retrieve(owner, response_id, delete=True)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
