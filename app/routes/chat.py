"""REST: send a message and get the whole reply; regenerate the last reply; edit the last user message.

Regenerate and edit cut the history back and answer again in one turn (app/chat.py): the cut is stored
with the new reply, and the decode state is rebuilt from the kept token ids rather than reused, so the new
reply never depends on the text that was removed.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from app.chat import ChatService, InputMessage, Turn, TurnOutcome
from app.deps import ChatDep, OwnerDep, SessionIdDep
from app.openai.items import item_id
from app.ratelimit import caller_identity
from app.routes.disconnect import watch_disconnect
from app.schemas import MessageOut, MessageRequest, ReplyOut, SamplingFields, Usage
from app.store.history import RewindTarget

router = APIRouter(prefix="/v1/sessions", tags=["chat"])


def reply_out(outcome: TurnOutcome) -> ReplyOut:
    """The response body for a finished turn (also the websocket's "done" frame)."""
    message = outcome.message
    return ReplyOut(
        message=MessageOut(
            id=item_id(message.seq) if message.seq else None,
            role="assistant",
            content=message.content,
            created_at=message.created_at,
            finish_reason=message.finish_reason,
        ),
        usage=Usage(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            context_tokens=outcome.context_tokens,
        ),
    )


async def _cancel_when(disconnected: asyncio.Event, turn: Turn) -> None:
    await disconnected.wait()
    turn.cancel()


async def _answer(
    request: Request,
    chat: ChatService,
    owner: str,
    session_id: str,
    content: str | None,
    fields: SamplingFields,
    rewind: RewindTarget | None = None,
) -> ReplyOut:
    params = chat.sampling_params(fields)
    inputs: list[InputMessage] = [] if content is None else [("user", chat.check_content(content))]
    # A client that hangs up cancels its generation (the partial reply is stored as "cancelled"), even
    # when it hangs up while the turn is still being set up.
    disconnected = asyncio.Event()
    tasks = [asyncio.create_task(watch_disconnect(request, disconnected.set))]
    try:
        tenant = caller_identity(owner, request.client.host if request.client else None)
        async with chat.turn(owner, session_id, inputs, params, rewind=rewind, tenant=tenant) as turn:
            tasks.append(asyncio.create_task(_cancel_when(disconnected, turn)))
            outcome = await turn.finish()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return reply_out(outcome)


@router.post("/{session_id}/messages", response_model_exclude_none=True)
async def post_message(
    session_id: SessionIdDep, body: MessageRequest, request: Request, owner: OwnerDep, chat: ChatDep
) -> ReplyOut:
    return await _answer(request, chat, owner, session_id, body.content, body)


@router.post("/{session_id}/regenerate", response_model_exclude_none=True)
async def regenerate(
    session_id: SessionIdDep, body: SamplingFields, request: Request, owner: OwnerDep, chat: ChatDep
) -> ReplyOut:
    """Replace the last reply by a new one (422 when the conversation does not end with a reply)."""
    return await _answer(request, chat, owner, session_id, None, body, "last_reply")


@router.post("/{session_id}/edit", response_model_exclude_none=True)
async def edit_last(
    session_id: SessionIdDep, body: MessageRequest, request: Request, owner: OwnerDep, chat: ChatDep
) -> ReplyOut:
    """Replace the last user message (and what followed it) by `content`, and answer it."""
    return await _answer(request, chat, owner, session_id, body.content, body, "last_user")
