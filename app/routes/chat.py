"""REST: send a message, get the whole reply."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request

from app.chat import Turn, TurnOutcome
from app.deps import ChatDep, OwnerDep, SessionIdDep
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


async def _cancel_on_disconnect(request: Request, turn: Turn) -> None:
    """A client that hangs up cancels its generation (the partial reply is stored as "cancelled")."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            turn.cancel()
            return


@router.post("/{session_id}/messages", response_model_exclude_none=True)
async def post_message(
    session_id: SessionIdDep, body: MessageRequest, request: Request, owner: OwnerDep, chat: ChatDep
) -> ReplyOut:
    content = chat.check_content(body.content)
    params = chat.sampling_params(body)
    async with chat.turn(owner, session_id, content, params) as turn:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, turn))
        try:
            outcome = await turn.finish()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return reply_out(outcome)
