"""REST: create, list, read (whole or by page), export and delete sessions."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from app.deps import ChatDep, OwnerDep, SessionIdDep
from app.export import export_json, export_markdown
from app.openai.items import item_id, seq_of
from app.schemas import MessageOut, MessagePage, SessionCreated, SessionList, SessionOut, SessionSummary
from app.store.sessions import StoredMessage

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def message_out(m: StoredMessage) -> MessageOut:
    return MessageOut(
        id=item_id(m.seq),
        role=m.role,
        content=m.content,
        created_at=m.created_at,
        finish_reason=m.finish_reason,
    )


@router.post("", status_code=201)
async def create_session(owner: OwnerDep, chat: ChatDep) -> SessionCreated:
    record = await chat.create_session(owner)
    return SessionCreated(session_id=record.session_id, created_at=record.created_at)


@router.get("")
async def list_sessions(
    owner: OwnerDep,
    chat: ChatDep,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> SessionList:
    """The caller's conversations, last updated first, by page (follow next_cursor)."""
    page = await chat.index.page(owner, cursor=cursor, limit=limit)
    return SessionList(
        sessions=[
            SessionSummary(
                session_id=info.session_id,
                title=info.title,
                created_at=info.created_at,
                updated_at=info.updated_at,
                message_count=info.messages,
                context_tokens=info.context_tokens,
            )
            for info in page.sessions
        ],
        next_cursor=page.next_cursor,
    )


@router.get("/{session_id}", response_model_exclude_none=True)
async def get_session(session_id: SessionIdDep, owner: OwnerDep, chat: ChatDep) -> SessionOut:
    record = await chat.get_session(owner, session_id)
    return SessionOut(
        session_id=record.session_id,
        created_at=record.created_at,
        messages=[message_out(m) for m in record.messages],
        context_tokens=record.context_tokens,
    )


@router.get("/{session_id}/messages", response_model_exclude_none=True)
async def page_messages(
    session_id: SessionIdDep,
    owner: OwnerDep,
    chat: ChatDep,
    before: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> MessagePage:
    """The latest `limit` messages, or those before message `before`: a long history by page."""
    cursor = seq_of(before, "before") if before else 0
    page = await chat.history.page(session_id, owner, cursor=cursor, limit=limit, order="desc")
    await chat.index.touched(owner)
    return MessagePage(
        messages=[message_out(m) for m in reversed(page.messages)],
        has_more=page.has_more,
        context_tokens=page.context_tokens,
    )


@router.get(
    "/{session_id}/export",
    response_class=Response,
    responses={
        200: {
            "description": "The conversation as a file: JSON (format=json) or Markdown (format=markdown)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/markdown": {"schema": {"type": "string"}},
            },
        }
    },
)
async def export_session(
    session_id: SessionIdDep,
    owner: OwnerDep,
    chat: ChatDep,
    format: Literal["json", "markdown"] = "json",
) -> Response:
    """The whole conversation as a JSON or Markdown file download."""
    info = await chat.info(owner, session_id)
    record = await chat.get_session(owner, session_id)
    if format == "markdown":
        body, media, ext = export_markdown(info, record.messages), "text/markdown; charset=utf-8", "md"
    else:
        body, media, ext = export_json(info, record.messages), "application/json", "json"
    disposition = f'attachment; filename="conversation-{session_id[:12]}.{ext}"'
    return Response(body, media_type=media, headers={"Content-Disposition": disposition})


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: SessionIdDep, owner: OwnerDep, chat: ChatDep) -> Response:
    await chat.delete_session(owner, session_id)
    return Response(status_code=204)
