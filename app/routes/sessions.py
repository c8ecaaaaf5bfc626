"""REST: create, read and delete sessions."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import ChatDep, OwnerDep, SessionIdDep
from app.schemas import MessageOut, SessionCreated, SessionOut

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.post("", status_code=201)
async def create_session(owner: OwnerDep, chat: ChatDep) -> SessionCreated:
    record = await chat.create_session(owner)
    return SessionCreated(session_id=record.session_id, created_at=record.created_at)


@router.get("/{session_id}", response_model_exclude_none=True)
async def get_session(session_id: SessionIdDep, owner: OwnerDep, chat: ChatDep) -> SessionOut:
    record = await chat.get_session(owner, session_id)
    return SessionOut(
        session_id=record.session_id,
        created_at=record.created_at,
        messages=[
            MessageOut(role=m.role, content=m.content, created_at=m.created_at, finish_reason=m.finish_reason)
            for m in record.messages
        ],
        context_tokens=record.context_tokens,
    )


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: SessionIdDep, owner: OwnerDep, chat: ChatDep) -> Response:
    await chat.delete_session(owner, session_id)
    return Response(status_code=204)
