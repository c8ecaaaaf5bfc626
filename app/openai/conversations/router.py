"""`/v1/conversations`: OpenAI's Conversations API (create, retrieve, update, delete; items list, create,
retrieve, delete) on this server's sessions. Errors in OpenAI's shape (app/openai/errors.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from app.deps import ChatDep, OwnerDep
from app.openai.conversations.protocol import (
    Conversation,
    ConversationCreateRequest,
    ConversationDeleted,
    ConversationUpdateRequest,
    ItemCreateRequest,
    ItemList,
)
from app.openai.conversations.serving import ConversationsServing
from app.openai.errors import OpenAIRoute

router = APIRouter(prefix="/v1/conversations", tags=["openai"], route_class=OpenAIRoute)


def get_serving(chat: ChatDep) -> ConversationsServing:
    return ConversationsServing(chat)


ServingDep = Annotated[ConversationsServing, Depends(get_serving)]


@router.post("")
async def create_conversation(
    body: ConversationCreateRequest, owner: OwnerDep, serving: ServingDep
) -> Conversation:
    return await serving.create(owner, body.items, body.metadata)


@router.get("/{conversation_id}")
async def retrieve_conversation(conversation_id: str, owner: OwnerDep, serving: ServingDep) -> Conversation:
    return await serving.retrieve(owner, conversation_id)


@router.post("/{conversation_id}")
async def update_conversation(
    conversation_id: str, body: ConversationUpdateRequest, owner: OwnerDep, serving: ServingDep
) -> Conversation:
    return await serving.update(owner, conversation_id, body.metadata)


@router.delete("/{conversation_id}")
async def delete_conversation(
    conversation_id: str, owner: OwnerDep, serving: ServingDep
) -> ConversationDeleted:
    await serving.delete(owner, conversation_id)
    return ConversationDeleted(id=conversation_id)


@router.get("/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    owner: OwnerDep,
    serving: ServingDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    include: Annotated[list[str] | None, Query(alias="include[]")] = None,  # nothing extra to include
) -> ItemList:
    return await serving.list_items(owner, conversation_id, after=after, limit=limit, order=order)


@router.post("/{conversation_id}/items")
async def create_items(
    conversation_id: str, body: ItemCreateRequest, owner: OwnerDep, serving: ServingDep
) -> ItemList:
    return await serving.create_items(owner, conversation_id, body.items)


@router.get("/{conversation_id}/items/{item_id}")
async def retrieve_item(
    conversation_id: str, item_id: str, owner: OwnerDep, serving: ServingDep
) -> dict[str, Any]:
    return await serving.retrieve_item(owner, conversation_id, item_id)


@router.delete("/{conversation_id}/items/{item_id}")
async def delete_item(
    conversation_id: str, item_id: str, owner: OwnerDep, serving: ServingDep
) -> Conversation:
    return await serving.delete_item(owner, conversation_id, item_id)
