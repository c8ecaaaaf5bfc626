"""REST: send a message, get the whole reply."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from app.chat import Turn, TurnOutcome
from app.deps import ChatDep, OwnerDep, SessionIdDep
from app.routes.disconnect import watch_disconnect
from app.schemas import MessageOut, MessageRequest, ReplyOut, Usage

router = APIRouter(prefix="/v1/sessions", tags=["chat"])


def reply_out(outcome: TurnOutcome) -> ReplyOut:
    """The response body for a finished turn (also the websocket's "done" frame)."""
    message = outcome.message
    return ReplyOut(
        message=MessageOut(
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


@router.post("/{session_id}/messages", response_model_exclude_none=True)
async def post_message(
    session_id: SessionIdDep, body: MessageRequest, request: Request, owner: OwnerDep, chat: ChatDep
) -> ReplyOut:
    content = chat.check_content(body.content)
    params = chat.sampling_params(body)
    # A client that hangs up cancels its generation (the partial reply is stored as "cancelled"), even
    # when it hangs up while the turn is still being set up.
    disconnected = asyncio.Event()
    tasks = [asyncio.create_task(watch_disconnect(request, disconnected.set))]
    try:
        async with chat.turn(owner, session_id, content, params) as turn:
            tasks.append(asyncio.create_task(_cancel_when(disconnected, turn)))
            outcome = await turn.finish()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return reply_out(outcome)
